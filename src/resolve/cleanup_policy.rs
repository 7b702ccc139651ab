//! The rules of a CleanupPolicy: its run request from the spec and the Upstreams
//! ([`World`]), the project of a GitLab-run policy, and its status from a run's report.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::world::World;
use super::{Error, Result};
use crate::cleanup::{parse_approvals, parse_duration};
use crate::crd::cleanup_policy::{PendingApproval, RunOutcome, RunSummary};
use crate::crd::conditions::{ConditionUpdate, SYNCED};
use crate::crd::reasons::Reason;
use crate::crd::{APPROVE_DELETION, CleanupPolicy};
use crate::gitlab::PathOrId;
use crate::sync::Mode;
use crate::sync::cleanup::{
    CleanupReport, CleanupRun, CleanupTarget, InUse, RunLimits, Safety, rule_spec,
};

/// The engine's input from the spec and the Upstreams ([`World`]).
pub fn request(
    policy: &CleanupPolicy,
    world: &impl World,
    in_use: InUse,
    now: Timestamp,
    mode: Mode,
) -> Result<CleanupRun> {
    let spec = &policy.spec;
    let invalid = |message: String| Error::InvalidSpec(message);
    let target = match (
        &spec.target.container_repositories,
        &spec.target.upstream_cache,
    ) {
        (Some(repositories), None) => match (&repositories.project, &repositories.group) {
            (Some(project), None) => CleanupTarget::Project {
                project: PathOrId::parse(project),
                path_regex: repositories.path_regex.clone(),
            },
            (None, Some(group)) => CleanupTarget::Group {
                group: PathOrId::parse(group),
                path_regex: repositories.path_regex.clone(),
            },
            _ => {
                return Err(invalid(
                    "target.containerRepositories needs exactly one of project or group".into(),
                ));
            }
        },
        (None, Some(cache)) => {
            let namespace = policy.namespace();
            let name = &cache.upstream_ref.name;
            let upstream = world
                .upstreams()
                .into_iter()
                .find(|u| u.namespace == namespace && &u.name == name)
                .ok_or_else(|| {
                    Error::MissingReference(format!("no Upstream named {name:?} in this namespace"))
                })?;
            let upstream_id = upstream.id.held().ok_or_else(|| {
                Error::InvalidSpec(format!("Upstream {name:?} has no GitLab id yet"))
            })?;
            CleanupTarget::UpstreamCache { upstream_id }
        }
        _ => {
            return Err(invalid(
                "target needs exactly one of containerRepositories or upstreamCache".into(),
            ));
        }
    };
    let rules = rule_spec(spec)?;
    let cache_not_downloaded_for = spec
        .cache_rules
        .as_ref()
        .map(|rules| {
            parse_duration(&rules.not_downloaded_for)
                .map_err(|e| invalid(e.in_field("cacheRules.notDownloadedFor").to_string()))
        })
        .transpose()?;
    Ok(CleanupRun {
        target,
        rules,
        cache_not_downloaded_for,
        safety: Safety::from(&spec.safety),
        in_use,
        dry_run: spec.dry_run,
        limits: RunLimits::from_spec(&spec.limits)?,
        now,
        mode,
        approved_deletions: policy
            .annotations()
            .get(APPROVE_DELETION)
            .map(|value| parse_approvals(value))
            .unwrap_or_default(),
    })
}

/// The project whose GitLab cleanup policy strategy `GitLabPolicy` manages.
pub fn gitlab_policy_project(policy: &CleanupPolicy) -> Result<PathOrId> {
    policy
        .spec
        .target
        .container_repositories
        .as_ref()
        .and_then(|t| t.project.as_deref())
        .map(PathOrId::parse)
        .ok_or_else(|| {
            Error::InvalidSpec(
                "strategy GitLabPolicy needs target.containerRepositories.project".into(),
            )
        })
}

/// `status.lastRun` from a run's report.
pub fn run_summary(
    report: &CleanupReport,
    start_time: Timestamp,
    completion_time: Timestamp,
) -> RunSummary {
    let count = |value: usize| i64::try_from(value).unwrap_or(i64::MAX);
    RunSummary {
        start_time: Time(start_time),
        completion_time: Some(Time(completion_time)),
        outcome: report.outcome,
        dry_run: report.simulated(),
        repositories: count(report.repositories),
        tags_evaluated: count(report.tags_evaluated),
        tags_deleted: count(report.tags_deleted),
        tags_kept: count(report.tags_kept),
        tags_protected: count(report.tags_protected),
        failures: count(report.failures),
        deleted_sample: report.deleted_sample.clone(),
        message: (report.outcome != RunOutcome::Succeeded || !report.notes.is_empty())
            .then(|| report.message.clone()),
        kept_by_reason: report
            .kept_by_reason
            .iter()
            .map(|(reason, kept)| (reason.as_str().to_owned(), count(*kept)))
            .collect(),
        pending_approval: report
            .pending_approvals
            .iter()
            .map(|pending| PendingApproval {
                repository: pending.repository.clone(),
                would_delete: count(pending.would_delete),
                total: count(pending.total),
                fingerprint: pending.fingerprint.clone(),
            })
            .collect(),
    }
}

/// `Synced` after a run: True unless GitLab stopped it.
pub fn run_condition(report: &CleanupReport) -> ConditionUpdate {
    match (&report.outcome, &report.error) {
        (RunOutcome::Failed, Some(error)) => {
            ConditionUpdate::new(SYNCED, false, error.reason(), report.message.clone())
        }
        (RunOutcome::Failed, None) => ConditionUpdate::new(
            SYNCED,
            false,
            Reason::RunFailed.as_str(),
            report.message.clone(),
        ),
        (RunOutcome::Partial, _) => ConditionUpdate::new(
            SYNCED,
            true,
            Reason::RunPartial.as_str(),
            report.message.clone(),
        ),
        (RunOutcome::Succeeded, _) => ConditionUpdate::new(
            SYNCED,
            true,
            Reason::RunSucceeded.as_str(),
            report.message.clone(),
        ),
        // The cleanup the spec asks for is not carried out until a person approves.
        (RunOutcome::NeedsApproval, _) => ConditionUpdate::new(
            SYNCED,
            false,
            Reason::NeedsApproval.as_str(),
            report.message.clone(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::crd::Upstream;
    use crate::crd::upstream::UpstreamStatus;
    use crate::resolve::Objects;

    fn policy(yaml: &str) -> CleanupPolicy {
        serde_saphyr::from_str(yaml).expect("valid CleanupPolicy")
    }

    /// The run with `upstreams` as the cluster's Upstreams.
    fn build_run<'a>(
        policy: &CleanupPolicy,
        upstreams: impl Iterator<Item = &'a Upstream>,
        in_use: InUse,
        now: Timestamp,
        mode: Mode,
    ) -> Result<CleanupRun> {
        let world = Objects {
            upstreams: upstreams.collect(),
            ..Default::default()
        };
        request(policy, &world, in_use, now, mode)
    }

    #[test]
    fn a_report_becomes_the_last_run_status() {
        let report = CleanupReport {
            outcome: RunOutcome::Partial,
            dry_run: false,
            mode: Mode::Apply,
            repositories: 2,
            tags_evaluated: 30,
            tags_deleted: 12,
            tags_kept: 18,
            tags_protected: 3,
            already_deleted: 0,
            withheld: 0,
            failures: 1,
            deleted_sample: vec!["acme/app:v1".into()],
            kept_by_reason: Default::default(),
            message: "stopped at maxDeletionsPerRun (12)".into(),
            notes: Vec::new(),
            repository_reports: Vec::new(),
            error: None,
            limit_reached: true,
            pending_approvals: Vec::new(),
        };
        let start: Timestamp = "2026-06-15T03:00:00Z".parse().expect("time");
        let end: Timestamp = "2026-06-15T03:01:00Z".parse().expect("time");
        let summary = run_summary(&report, start, end);
        assert_eq!(summary.start_time, Time(start));
        assert_eq!(summary.completion_time, Some(Time(end)));
        assert_eq!(summary.outcome, RunOutcome::Partial);
        assert!(!summary.dry_run);
        let counts = (
            summary.repositories,
            summary.tags_evaluated,
            summary.tags_deleted,
            summary.tags_kept,
            summary.tags_protected,
            summary.failures,
        );
        assert_eq!(counts, (2, 30, 12, 18, 3, 1));
        assert_eq!(summary.deleted_sample, vec!["acme/app:v1".to_owned()]);
        assert_eq!(
            summary.message.as_deref(),
            Some("stopped at maxDeletionsPerRun (12)")
        );
        let planned = CleanupReport {
            mode: Mode::Plan,
            ..report
        };
        assert!(run_summary(&planned, start, end).dry_run);
    }

    #[test]
    fn an_upstream_cache_target_resolves_the_upstream_id_in_the_namespace() {
        let cache = policy(
            "apiVersion: gitlabregistry.io/v1alpha1\nkind: CleanupPolicy\nmetadata: {name: c, namespace: team}\nspec:\n  target: {upstreamCache: {upstreamRef: {name: dockerhub}}}\n  cacheRules: {notDownloadedFor: 30d}\n",
        );
        let mut upstream: Upstream = serde_saphyr::from_str(
            "apiVersion: gitlabregistry.io/v1alpha1\nkind: Upstream\nmetadata: {name: dockerhub, namespace: team}\nspec: {group: g, url: 'https://registry-1.docker.io'}\n",
        )
        .expect("upstream");
        let in_use = || InUse::Unavailable("test".into());
        let missing = build_run(
            &cache,
            std::iter::empty(),
            in_use(),
            Timestamp::UNIX_EPOCH,
            Mode::Apply,
        );
        assert!(missing.is_err_and(|e| e.to_string().contains("no Upstream named")));
        let pending = build_run(
            &cache,
            [&upstream].into_iter(),
            in_use(),
            Timestamp::UNIX_EPOCH,
            Mode::Apply,
        );
        assert!(pending.is_err_and(|e| e.to_string().contains("no GitLab id yet")));
        upstream.status = Some(UpstreamStatus {
            upstream_id: Some(400),
            ..Default::default()
        });
        let run = build_run(
            &cache,
            [&upstream].into_iter(),
            in_use(),
            Timestamp::UNIX_EPOCH,
            Mode::Apply,
        )
        .expect("resolves");
        assert_eq!(
            run.target,
            CleanupTarget::UpstreamCache { upstream_id: 400 }
        );
        assert_eq!(
            run.cache_not_downloaded_for,
            Some(Duration::from_secs(30 * 86400))
        );
        let mut other = upstream.clone();
        other.metadata.namespace = Some("elsewhere".into());
        assert!(
            build_run(
                &cache,
                [&other].into_iter(),
                in_use(),
                Timestamp::UNIX_EPOCH,
                Mode::Apply
            )
            .is_err()
        );
    }

    #[test]
    fn a_project_target_carries_rules_limits_and_safety() {
        let project = policy(
            "apiVersion: gitlabregistry.io/v1alpha1\nkind: CleanupPolicy\nmetadata: {name: p, namespace: team}\nspec:\n  dryRun: true\n  target: {containerRepositories: {project: my-org/app, pathRegex: 'my-org/app/.*'}}\n  rules: {nameRegexDelete: '.*', keepN: 3}\n  safety: {keepInUse: false}\n  limits: {maxDeletionsPerRun: 7}\n",
        );
        let run = build_run(
            &project,
            std::iter::empty(),
            InUse::Unavailable("x".into()),
            Timestamp::UNIX_EPOCH,
            Mode::Apply,
        )
        .expect("valid");
        assert_eq!(
            run.target,
            CleanupTarget::Project {
                project: PathOrId::Path("my-org/app".into()),
                path_regex: Some("my-org/app/.*".into())
            }
        );
        assert!(run.dry_run);
        assert_eq!(run.rules.keep_n, Some(3));
        assert_eq!(run.limits.max_deletions_per_run, 7);
        assert!(!run.safety.keep_in_use && run.safety.keep_shared_digests);
    }
}
