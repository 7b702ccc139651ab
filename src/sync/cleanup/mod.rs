//! The cleanup engines: one cleanup run (container tags of a project or group, or an
//! upstream's cache entries) and the sync of a project's GitLab-run cleanup policy.
//!
//! [`run_cleanup`] performs ONE run of a `CleanupPolicy` with strategy `Operator`:
//!
//! 1. validates everything first (rules, path regex, durations, limits): a bad spec is
//!    [`Error::InvalidSpec`] before any GitLab request;
//! 2. lists the target's container repositories (a project's, or every project's of a group)
//!    and keeps those whose `path` matches `pathRegex` (anchored, `\A(?:…)\z`);
//! 3. per repository: lists its tags (keyset pagination, offset when GitLab refuses keyset),
//!    fetches tag details only for tags whose list entry lacks `digest` or `created_at`,
//!    reads the project's tag protection rules once per project, and asks
//!    [`cleanup::select()`] which tags go;
//!    With `safety.keepBranchTags` the project's branches are read once per project too; a
//!    project whose branches cannot be read deletes nothing, and the run says why;
//! 4. with `limits.maxDeletionPercent`, a repository whose selection is more than that share
//!    of its tags deletes nothing unless [`CleanupRun::approved_deletions`] holds the
//!    fingerprint of exactly that selection ([`cleanup::check_budget`]); it is listed in
//!    [`CleanupReport::pending_approvals`] and the run ends [`RunOutcome::NeedsApproval`]. A dry
//!    run or plan reports the same approvals a real run would ask for. The budget looks at the
//!    whole selection, before `maxDeletionsPerRun`, so that a plan cannot be approved in one
//!    piece and carried out over several runs it was not shown for;
//! 5. deletes the selected tags one at a time (`DELETE …/tags/:tag_name`, never the bulk
//!    endpoint, which cannot honour in-use and shared-digest protections), oldest first,
//!    paced at `requestsPerSecond`, stopping at `maxDeletionsPerRun`.
//!
//! Every GitLab request of a run waits for the run's own pacer (one request per
//! `1 / requestsPerSecond`); the pages of one listing follow each other unpaced.
//!
//! Safety, everywhere: when in doubt, keep. A dry run ([`CleanupRun::dry_run`]) or
//! [`Mode::Plan`] sends no DELETE at all, under any fault: deletions happen only behind
//! [`DeletePermission::Live`]. With `safety.keepInUse` and no knowledge of what Pods run
//! ([`InUse::Unavailable`]: standalone mode, Pod cache not synced yet), the run evaluates
//! everything, deletes nothing, ends [`RunOutcome::Partial`] when the rules selected
//! anything, and says why in its message. A repository whose tag details or protection
//! rules cannot be read (after the client's retries) gets no deletion at all, and counts as
//! a failure. Tag protection rules that GitLab refuses to show (403/404: listing them needs
//! Maintainer) are left to GitLab, noted, and are no error of the run. GitLab refuses to
//! delete a tag a rule covers with a plain `403 {"message":"403 Forbidden"}`, before its
//! delete service runs, and its rule list never shows immutable rules: so every 403 on a
//! single tag's DELETE counts as that tag protected, whatever the body, never as a failure,
//! and is not retried. With unreadable rules and `keepSharedDigests`, selected tags sharing a
//! digest with another tag are kept, since a refusal could leave that digest tagged.
//!
//! Errors: a 404 on a deletion counts as deleted by someone else; a 401, a 403 on a write
//! other than a tag's DELETE, or a 429 the client would not wait out stops the run;
//! GitLab unavailable (5xx, timeout, network, each after the client's retries) is a failure,
//! and [`MAX_CONSECUTIVE_UNAVAILABLE`] in a row stop the run; any other error is a failure
//! and the run goes on. A 403 while reading one repository's tags concerns that repository
//! only. A stopped run is `Failed` when it deleted nothing, else `Partial`; failures, skipped
//! repositories, the deletion limit and withheld deletions make it `Partial`.
//!
//! An `upstreamCache` target lists the upstream's cache entries, deletes those
//! [`cleanup::select_expired`] picks, with the same pacing, limit, dry run and report (entries
//! are counted in the `tags*` fields).
//!
//! [`sync_gitlab_policy`] is strategy `GitLabPolicy`: it makes the project's
//! `container_expiration_policy` match the spec with one `PUT /projects/:id` carrying only
//! the fields that differ, and none when nothing does.
//!
//! This file owns the run request (target, rules, safety, limits, validation) and re-exports
//! the rest: `run.rs` performs a run ([`run_cleanup`]), `report.rs` is what it reports
//! ([`CleanupReport`]), `gitlab_policy.rs` syncs a project's GitLab-run cleanup policy
//! ([`sync_gitlab_policy`]).
//!
//! [`RunOutcome::NeedsApproval`]: crate::crd::cleanup_policy::RunOutcome::NeedsApproval
//! [`RunOutcome::Partial`]: crate::crd::cleanup_policy::RunOutcome::Partial

mod gitlab_policy;
mod report;
mod run;

pub use gitlab_policy::{DesiredGitLabPolicy, PolicyOutcome, sync_gitlab_policy};
pub use report::{CleanupReport, RepositoryReport};
pub use run::run_cleanup;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use regex::Regex;

use super::{Error, Mode, Result};
use crate::cleanup::{self, CompiledRules, FamilySpec, InUseIndex, RuleSpec};
use crate::crd::cleanup_policy::{CleanupPolicySpec, Limits, Safety as SpecSafety};
use crate::gitlab::PathOrId;

/// Spec field names, as users write them, for `InvalidSpec` messages.
pub const FIELD_PATH_REGEX: &str = "target.containerRepositories.pathRegex";
pub const FIELD_NOT_DOWNLOADED_FOR: &str = "cacheRules.notDownloadedFor";
pub const FIELD_MAX_DELETIONS_PER_RUN: &str = "limits.maxDeletionsPerRun";
pub const FIELD_REQUESTS_PER_SECOND: &str = "limits.requestsPerSecond";
pub const FIELD_KEEP_N: &str = "rules.keepN";
pub const FIELD_KEEP_N_PER_FAMILY_N: &str = "rules.keepNPerFamily.n";
pub const FIELD_MAX_DELETION_PERCENT: &str = "limits.maxDeletionPercent";
pub const FIELD_CADENCE: &str = "cadence";

/// After this many GitLab-unavailable answers in a row (each already retried by the client)
/// a run stops instead of trying the next tag.
pub const MAX_CONSECUTIVE_UNAVAILABLE: u32 = 3;

/// What one run cleans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CleanupTarget {
    /// The container repositories of one project.
    Project {
        project: PathOrId,
        /// Only repositories whose `path` matches (RE2, anchored at both ends).
        path_regex: Option<String>,
    },
    /// The container repositories of every project in a group (subgroups included, as
    /// GitLab's `GET /groups/:id/registry/repositories` lists them).
    Group {
        group: PathOrId,
        path_regex: Option<String>,
    },
    /// The cache entries of one upstream (its GitLab id, resolved from `upstreamRef`).
    UpstreamCache { upstream_id: i64 },
}

/// Protections on top of the rules (`spec.safety`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Safety {
    /// Never delete a tag that a Pod runs; with [`InUse::Unavailable`] nothing is deleted.
    pub keep_in_use: bool,
    /// Never delete a tag whose digest a kept tag also has.
    pub keep_shared_digests: bool,
}

impl Default for Safety {
    fn default() -> Self {
        Self {
            keep_in_use: true,
            keep_shared_digests: true,
        }
    }
}

impl From<&SpecSafety> for Safety {
    fn from(safety: &SpecSafety) -> Self {
        Self {
            keep_in_use: safety.keep_in_use,
            keep_shared_digests: safety.keep_shared_digests,
        }
    }
}

/// What the run knows about the images Pods run.
#[derive(Debug, Clone)]
pub enum InUse {
    /// Every image and imageID of every container in the cluster.
    Known(Arc<InUseIndex>),
    /// Not known, and why (standalone mode, Pod cache not yet synced, …).
    Unavailable(String),
}

/// Bounds on one run (`spec.limits`), validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLimits {
    /// At least 1.
    pub max_deletions_per_run: u32,
    /// At least 1; paces every request of the run.
    pub requests_per_second: u32,
    /// 1..=100: a repository losing more than this share of its tags needs approval.
    pub max_deletion_percent: Option<u8>,
}

impl Default for RunLimits {
    fn default() -> Self {
        Self {
            max_deletions_per_run: 1000,
            requests_per_second: 10,
            max_deletion_percent: None,
        }
    }
}

impl RunLimits {
    /// From the CRD's `limits`; a value below 1 is [`Error::InvalidSpec`].
    pub fn from_spec(limits: &Limits) -> Result<Self> {
        let limits = Self {
            max_deletions_per_run: u32::try_from(limits.max_deletions_per_run).unwrap_or(0),
            requests_per_second: u32::try_from(limits.requests_per_second).unwrap_or(0),
            max_deletion_percent: limits
                .max_deletion_percent
                .map(|percent| u8::try_from(percent).unwrap_or(0)),
        };
        limits.validate()?;
        Ok(limits)
    }

    fn validate(&self) -> Result<()> {
        if self.max_deletions_per_run == 0 {
            return Err(Error::InvalidSpec(format!(
                "{FIELD_MAX_DELETIONS_PER_RUN} must be at least 1"
            )));
        }
        if self.requests_per_second == 0 {
            return Err(Error::InvalidSpec(format!(
                "{FIELD_REQUESTS_PER_SECOND} must be at least 1"
            )));
        }
        if let Some(percent) = self.max_deletion_percent
            && !(1..=100).contains(&percent)
        {
            return Err(Error::InvalidSpec(format!(
                "{FIELD_MAX_DELETION_PERCENT} must be between 1 and 100"
            )));
        }
        Ok(())
    }
}

/// The pure module's [`RuleSpec`] from the CRD's `rules` and `safety.keepBranchTags` (no
/// `rules`: only what `safety` says); a negative `keepN` or a `keepNPerFamily.n` below 1 is
/// [`Error::InvalidSpec`].
pub fn rule_spec(spec: &CleanupPolicySpec) -> Result<RuleSpec> {
    let keep_branch_tags = spec
        .safety
        .keep_branch_tags
        .as_ref()
        .map(|keep| keep.pattern.clone());
    let Some(rules) = &spec.rules else {
        return Ok(RuleSpec {
            keep_branch_tags,
            ..RuleSpec::default()
        });
    };
    let keep_n_per_family = rules
        .keep_n_per_family
        .as_ref()
        .map(|family| {
            let n = u32::try_from(family.n)
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| {
                    Error::InvalidSpec(format!(
                        "{FIELD_KEEP_N_PER_FAMILY_N} must be at least 1, got {}",
                        family.n
                    ))
                })?;
            Ok::<_, Error>(FamilySpec {
                pattern: family.pattern.clone(),
                n,
            })
        })
        .transpose()?;
    let keep_n = rules
        .keep_n
        .map(|keep_n| {
            u32::try_from(keep_n).map_err(|_| {
                Error::InvalidSpec(format!("{FIELD_KEEP_N} must not be negative, got {keep_n}"))
            })
        })
        .transpose()?;
    Ok(RuleSpec {
        name_regex_delete: rules.name_regex_delete.clone(),
        name_regex_keep: rules.name_regex_keep.clone(),
        keep_n,
        older_than: rules.older_than.clone(),
        keep_n_per_family,
        keep_branch_tags,
    })
}

/// One run, as the controller or `apply` resolved it from a `CleanupPolicy`.
#[derive(Debug, Clone)]
pub struct CleanupRun {
    pub target: CleanupTarget,
    /// Tag rules; required for repository targets, unused for an upstream cache.
    pub rules: RuleSpec,
    /// `cacheRules.notDownloadedFor`; required for an upstream cache target.
    pub cache_not_downloaded_for: Option<Duration>,
    pub safety: Safety,
    pub in_use: InUse,
    /// `spec.dryRun`: evaluate and report, delete nothing.
    pub dry_run: bool,
    pub limits: RunLimits,
    /// "Now" for `olderThan` and `notDownloadedFor`.
    pub now: Timestamp,
    /// [`Mode::Plan`] sends only GET requests, like a dry run.
    pub mode: Mode,
    /// Fingerprints of selections approved past `maxDeletionPercent` (annotation
    /// `gitlabregistry.io/approve-deletion`, or `apply --approve`).
    pub approved_deletions: BTreeSet<String>,
}

/// Whether a run may delete, decided once before the first request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeletePermission {
    /// Deletions are sent.
    Live,
    /// Dry run or plan: deletions are only counted, never sent.
    Simulated,
    /// Nothing may be deleted, for this reason (keepInUse without knowing what Pods run).
    Withheld(String),
}

/// Whether `run` may send deletions: never in a dry run or plan, and not for container
/// repositories with `keepInUse` while the images Pods run are unknown (an upstream cache
/// does not depend on Pods: its entries are fetched again on the next pull).
pub fn delete_permission(run: &CleanupRun) -> DeletePermission {
    if run.dry_run {
        return DeletePermission::Simulated;
    }
    // Checked before plan mode, so that a plan predicts what apply would really do.
    match (&run.in_use, &run.target) {
        (InUse::Unavailable(reason), CleanupTarget::Project { .. })
        | (InUse::Unavailable(reason), CleanupTarget::Group { .. })
            if run.safety.keep_in_use =>
        {
            DeletePermission::Withheld(format!(
                "keepInUse is set but the images Pods run are unknown ({reason}), so nothing \
                 was deleted"
            ))
        }
        _ if !run.mode.writes() => DeletePermission::Simulated,
        _ => DeletePermission::Live,
    }
}

/// How a run's selection was compiled and checked before any request.
enum Validated {
    Tags {
        rules: Box<CompiledRules>,
        path_regex: Option<Regex>,
    },
    Cache {
        upstream_id: i64,
        not_downloaded_for: Duration,
    },
}

/// Checks a run without calling GitLab: the errors [`run_cleanup`] would return first.
pub fn validate(run: &CleanupRun) -> Result<()> {
    compile(run).map(|_| ())
}

fn compile(run: &CleanupRun) -> Result<Validated> {
    run.limits.validate()?;
    match &run.target {
        CleanupTarget::Project { path_regex, .. } | CleanupTarget::Group { path_regex, .. } => {
            let rules = CompiledRules::compile(&run.rules)
                .map_err(|error| Error::InvalidSpec(error.to_string()))?;
            let path_regex = path_regex.as_deref().map(compile_path_regex).transpose()?;
            Ok(Validated::Tags {
                rules: Box::new(rules),
                path_regex,
            })
        }
        CleanupTarget::UpstreamCache { upstream_id } => {
            let not_downloaded_for = run.cache_not_downloaded_for.ok_or_else(|| {
                Error::InvalidSpec(format!(
                    "{FIELD_NOT_DOWNLOADED_FOR} is required for an upstreamCache target"
                ))
            })?;
            if not_downloaded_for.is_zero() {
                return Err(Error::InvalidSpec(format!(
                    "{FIELD_NOT_DOWNLOADED_FOR} must be longer than zero"
                )));
            }
            Ok(Validated::Cache {
                upstream_id: *upstream_id,
                not_downloaded_for,
            })
        }
    }
}

/// `\A(?:pattern)\z`; the pattern must also compile on its own, so wrapping cannot "repair"
/// an unbalanced one.
fn compile_path_regex(pattern: &str) -> Result<Regex> {
    let invalid = |error: regex::Error| {
        Error::InvalidSpec(
            cleanup::Error::InvalidRegex {
                field: FIELD_PATH_REGEX,
                pattern: pattern.to_owned(),
                message: error.to_string(),
            }
            .to_string(),
        )
    };
    Regex::new(pattern).map_err(invalid)?;
    Regex::new(&format!(r"\A(?:{pattern})\z")).map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with(target: CleanupTarget) -> CleanupRun {
        CleanupRun {
            target,
            rules: RuleSpec {
                name_regex_delete: Some(".*".into()),
                ..RuleSpec::default()
            },
            cache_not_downloaded_for: None,
            safety: Safety::default(),
            in_use: InUse::Unavailable("test".into()),
            dry_run: false,
            limits: RunLimits::default(),
            now: Timestamp::UNIX_EPOCH,
            mode: Mode::Apply,
            approved_deletions: Default::default(),
        }
    }

    #[test]
    fn path_regex_is_anchored_at_both_ends_and_checked_alone() {
        let regex = compile_path_regex("acme/app|acme/web").expect("valid");
        assert!(regex.is_match("acme/app"));
        assert!(regex.is_match("acme/web"));
        assert!(!regex.is_match("acme/app/api"));
        assert!(!regex.is_match("x/acme/web"));
        let error = compile_path_regex("a)|(b").expect_err("unbalanced");
        assert_eq!(error.reason(), "InvalidSpec");
        assert!(error.message().starts_with(FIELD_PATH_REGEX), "{error}");
    }

    #[test]
    fn limits_and_keep_n_below_their_minimum_are_invalid_specs() {
        for (max, rate, field) in [
            (0, 10, FIELD_MAX_DELETIONS_PER_RUN),
            (-5, 10, FIELD_MAX_DELETIONS_PER_RUN),
            (10, 0, FIELD_REQUESTS_PER_SECOND),
        ] {
            let error = RunLimits::from_spec(&Limits {
                max_deletions_per_run: max,
                requests_per_second: rate,
                max_deletion_percent: None,
            })
            .expect_err("invalid");
            assert!(error.message().contains(field), "{error}");
        }
        assert_eq!(
            RunLimits::from_spec(&Limits::default()).expect("defaults"),
            RunLimits::default()
        );
        let spec = |extra: serde_json::Value| -> CleanupPolicySpec {
            let mut spec = serde_json::json!({
                "target": {"containerRepositories": {"project": "a/b"}},
                "rules": {"nameRegexDelete": ".*"},
            });
            spec["rules"]
                .as_object_mut()
                .expect("object")
                .extend(extra.as_object().expect("object").clone());
            serde_json::from_value(spec).expect("spec")
        };
        assert!(
            rule_spec(&spec(serde_json::json!({"keepN": -1})))
                .expect_err("negative")
                .message()
                .contains(FIELD_KEEP_N)
        );
        assert_eq!(
            rule_spec(&spec(serde_json::json!({"keepN": 3})))
                .expect("valid")
                .keep_n,
            Some(3)
        );
        let family = serde_json::json!({"keepNPerFamily": {"pattern": "(.+)-[0-9a-f]{8}", "n": 0}});
        assert!(
            rule_spec(&spec(family))
                .expect_err("n below 1")
                .message()
                .contains(FIELD_KEEP_N_PER_FAMILY_N)
        );
        let mut with_branches =
            spec(serde_json::json!({"keepNPerFamily": {"pattern": "(.+)", "n": 2}}));
        with_branches.safety.keep_branch_tags = Some(crate::crd::cleanup_policy::KeepBranchTags {
            pattern: "(.+)-[0-9a-f]{8}".into(),
        });
        let rules = rule_spec(&with_branches).expect("valid");
        assert_eq!(
            rules.keep_n_per_family,
            Some(FamilySpec {
                pattern: "(.+)".into(),
                n: 2
            })
        );
        assert_eq!(rules.keep_branch_tags.as_deref(), Some("(.+)-[0-9a-f]{8}"));
        for percent in [0, 101] {
            let error = RunLimits::from_spec(&Limits {
                max_deletion_percent: Some(percent),
                ..Limits::default()
            })
            .expect_err("out of range");
            assert!(
                error.message().contains(FIELD_MAX_DELETION_PERCENT),
                "{error}"
            );
        }
    }

    #[test]
    fn a_cache_target_needs_a_positive_not_downloaded_for() {
        let mut run = run_with(CleanupTarget::UpstreamCache { upstream_id: 3 });
        assert!(validate(&run).is_err());
        run.cache_not_downloaded_for = Some(Duration::ZERO);
        assert!(
            validate(&run)
                .expect_err("zero")
                .message()
                .contains(FIELD_NOT_DOWNLOADED_FOR)
        );
        run.cache_not_downloaded_for = Some(Duration::from_secs(60));
        // Tag rules do not matter for a cache target.
        run.rules = RuleSpec::default();
        assert!(validate(&run).is_ok());
    }

    #[test]
    fn dry_run_plan_and_unknown_pods_decide_the_delete_permission_once() {
        let project = CleanupTarget::Project {
            project: PathOrId::Id(1),
            path_regex: None,
        };
        let mut run = run_with(project);
        assert!(matches!(
            delete_permission(&run),
            DeletePermission::Withheld(_)
        ));
        run.safety.keep_in_use = false;
        assert_eq!(delete_permission(&run), DeletePermission::Live);
        run.dry_run = true;
        assert_eq!(delete_permission(&run), DeletePermission::Simulated);
        run.dry_run = false;
        run.mode = Mode::Plan;
        assert_eq!(delete_permission(&run), DeletePermission::Simulated);
        // Pods do not matter for an upstream cache.
        let mut cache = run_with(CleanupTarget::UpstreamCache { upstream_id: 1 });
        cache.cache_not_downloaded_for = Some(Duration::from_secs(1));
        assert_eq!(delete_permission(&cache), DeletePermission::Live);
    }
}
