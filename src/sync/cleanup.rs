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

use crate::crd::reasons::Reason;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use regex::Regex;
use tokio::time::{Interval, MissedTickBehavior};

use super::{Action, Error, FieldChange, Mode, Result};
use crate::cleanup::{
    self, BudgetVerdict, CacheEntryInfo, CompiledRules, FamilySpec, InUseIndex, KeepReason,
    PendingApproval, ProjectBranches, ProtectedTags, Protections, RuleSpec, TagInfo,
};
use crate::crd::cleanup_policy::{
    CleanupPolicySpec, DELETED_SAMPLE_SIZE, GitLabCadence, GitLabKeepN, GitLabOlderThan, Limits,
    RunOutcome, Safety as SpecSafety, TagRules,
};
use crate::gitlab::{
    self, ContainerExpirationPolicy, ContainerExpirationPolicyUpdate, ContainerRepository,
    GitLabClient, PathOrId, RepositoryListRequest, SortOrder, Tag,
};

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

/// What the deletion loop may do next.
enum Deletion {
    Stop,
    /// Counted as deleted, not sent.
    Simulated,
    /// Sent; the caller takes the budget when GitLab confirms.
    Live,
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
    fn for_repository(repository: &ContainerRepository) -> Self {
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
    fn new(run: &CleanupRun) -> Self {
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

fn plural(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// Performs one cleanup run. Only an invalid spec is an `Err` (before any request); GitLab
/// trouble ends the run early with [`RunOutcome::Partial`] or [`RunOutcome::Failed`] and the
/// error in [`CleanupReport::error`].
pub async fn run_cleanup(client: &GitLabClient, run: &CleanupRun) -> Result<CleanupReport> {
    let validated = compile(run)?;
    let mut engine = Engine::new(client, run);
    match validated {
        Validated::Tags { rules, path_regex } => {
            engine.report.notes.extend(rules.notes().iter().cloned());
            engine.run_repositories(&rules, path_regex.as_ref()).await;
        }
        Validated::Cache {
            upstream_id,
            not_downloaded_for,
        } => engine.run_cache(upstream_id, not_downloaded_for).await,
    }
    Ok(engine.finish())
}

/// One request per period; the first one at once.
struct Pacer {
    interval: Interval,
}

impl Pacer {
    fn new(requests_per_second: u32) -> Self {
        let period = Duration::from_secs(1) / requests_per_second.max(1);
        let mut interval = tokio::time::interval(period.max(Duration::from_micros(1)));
        // After a slow request, keep the spacing instead of bursting to catch up.
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self { interval }
    }

    async fn wait(&mut self) {
        self.interval.tick().await;
    }
}

/// What to do after a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disposition {
    /// The record is gone (404).
    Gone,
    /// GitLab is unavailable even after the client's retries: a failure, and a stop after
    /// [`MAX_CONSECUTIVE_UNAVAILABLE`] in a row.
    Unavailable,
    /// The token cannot do this, or GitLab asks us to wait longer than the client would:
    /// nothing later in the run can succeed.
    Stop,
    /// This one request failed; the next may not.
    Failure,
}

fn disposition(error: &gitlab::Error) -> Disposition {
    match error {
        gitlab::Error::NotFound { .. } => Disposition::Gone,
        gitlab::Error::Server { .. }
        | gitlab::Error::Timeout { .. }
        | gitlab::Error::Network { .. } => Disposition::Unavailable,
        gitlab::Error::Unauthorized { .. }
        | gitlab::Error::Forbidden { .. }
        | gitlab::Error::RateLimited { .. }
        | gitlab::Error::Config { .. } => Disposition::Stop,
        gitlab::Error::Validation { .. }
        | gitlab::Error::Parameter { .. }
        | gitlab::Error::Conflict { .. }
        | gitlab::Error::LimitExceeded { .. }
        | gitlab::Error::UnexpectedStatus { .. }
        | gitlab::Error::Decode { .. } => Disposition::Failure,
    }
}

/// GitLab's refusal to delete one tag. A protection rule (immutable ones included, which the
/// rule list never shows) makes GitLab's policy answer a plain `403 {"message":"403
/// Forbidden"}` before the delete service runs; only the bulk service path adds `- cannot
/// delete protected tag(s)` (INFERRED). The body cannot tell a protected tag from anything
/// else, so any 403 on a single tag's DELETE is that tag protected.
fn is_protected_tag_refusal(error: &gitlab::Error) -> bool {
    matches!(error, gitlab::Error::Forbidden { .. })
}

/// What is known about a project's branches (`safety.keepBranchTags`).
#[derive(Debug, Clone)]
enum BranchState {
    Known(Arc<ProjectBranches>),
    /// Could not be read; no deletions in this project.
    Unknown(String),
}

/// What is known about a project's tag protection rules.
#[derive(Debug, Clone)]
enum ProtectionState {
    Rules(ProtectedTags),
    /// GitLab does not show them (403/404); it still refuses protected deletions with 403.
    EnforcedByGitLab,
    /// Could not be read; no deletions in this project.
    Unknown(String),
}

struct Engine<'a> {
    client: &'a GitLabClient,
    run: &'a CleanupRun,
    pacer: Pacer,
    permission: DeletePermission,
    /// Deletions left before `maxDeletionsPerRun`.
    budget: u32,
    report: CleanupReport,
    consecutive_unavailable: u32,
    protections: HashMap<PathOrId, ProtectionState>,
    branches: HashMap<PathOrId, BranchState>,
    first_failure: Option<String>,
    repositories_not_evaluated: usize,
}

impl<'a> Engine<'a> {
    fn new(client: &'a GitLabClient, run: &'a CleanupRun) -> Self {
        let permission = delete_permission(run);
        Self {
            client,
            run,
            pacer: Pacer::new(run.limits.requests_per_second),
            permission,
            budget: run.limits.max_deletions_per_run,
            report: CleanupReport::new(run),
            consecutive_unavailable: 0,
            protections: HashMap::new(),
            branches: HashMap::new(),
            first_failure: None,
            repositories_not_evaluated: 0,
        }
    }

    fn stopped(&self) -> bool {
        self.report.error.is_some()
    }

    /// Whether the next deletion may go ahead, and how: the run has not stopped, the
    /// per-run budget is not spent (else `limit_reached`), and deletions are permitted. A
    /// simulated or live deletion takes one unit of the budget.
    fn next_deletion(&mut self) -> Deletion {
        if self.stopped() {
            return Deletion::Stop;
        }
        if self.budget == 0 {
            self.report.limit_reached = true;
            return Deletion::Stop;
        }
        match &self.permission {
            DeletePermission::Withheld(_) => Deletion::Stop,
            DeletePermission::Simulated => {
                self.budget -= 1;
                Deletion::Simulated
            }
            DeletePermission::Live => Deletion::Live,
        }
    }

    fn stop(&mut self, error: gitlab::Error) {
        if self.report.error.is_none() {
            self.report.error = Some(Error::GitLab(error));
        }
    }

    fn record_failure(&mut self, context: String) {
        self.report.failures += 1;
        if self.first_failure.is_none() {
            self.first_failure = Some(context);
        }
    }

    /// Handles a failed request other than a deletion refusal. Returns the disposition, after
    /// counting it (a failure, or a stop).
    fn settle_error(&mut self, error: gitlab::Error, context: &str) -> Disposition {
        let disposition = disposition(&error);
        match disposition {
            Disposition::Gone => {}
            Disposition::Stop => {
                self.stop(error);
            }
            Disposition::Unavailable => {
                self.record_failure(format!("{context}: {}", error.message()));
                self.consecutive_unavailable += 1;
                if self.consecutive_unavailable >= MAX_CONSECUTIVE_UNAVAILABLE {
                    self.stop(error);
                }
            }
            Disposition::Failure => {
                self.record_failure(format!("{context}: {}", error.message()));
            }
        }
        disposition
    }

    /// Like [`Self::settle_error`], but a 403 on a read concerns this repository or project
    /// only (registry access switched off there, say): a failure, not a stop.
    fn settle_read_error(&mut self, error: gitlab::Error, context: &str) -> Disposition {
        if matches!(error, gitlab::Error::Forbidden { .. }) {
            self.record_failure(format!("{context}: {}", error.message()));
            return Disposition::Failure;
        }
        self.settle_error(error, context)
    }

    fn succeeded(&mut self) {
        self.consecutive_unavailable = 0;
    }

    // ---- container repositories ----------------------------------------------------------

    async fn run_repositories(&mut self, rules: &CompiledRules, path_regex: Option<&Regex>) {
        if let (InUse::Known(index), true) = (&self.run.in_use, self.run.safety.keep_in_use)
            && !index.unparsed().is_empty()
        {
            self.report.notes.push(format!(
                "{} Pod image strings could not be read; digests found in them are still kept",
                index.unparsed().len()
            ));
        }
        if let (DeletePermission::Simulated, InUse::Unavailable(reason), true) = (
            &self.permission,
            &self.run.in_use,
            self.run.safety.keep_in_use,
        ) {
            self.report.notes.push(format!(
                "the images Pods run are unknown ({reason}): the tags listed as to be deleted \
                 do not account for them, and a real run would delete nothing"
            ));
        }

        self.pacer.wait().await;
        let listed = match &self.run.target {
            CleanupTarget::Project { project, .. } => {
                self.client
                    .list_project_repositories_all(project, &RepositoryListRequest::default())
                    .await
            }
            CleanupTarget::Group { group, .. } => {
                self.client.list_group_repositories_all(group).await
            }
            CleanupTarget::UpstreamCache { .. } => Ok(Vec::new()),
        };
        let repositories = match listed {
            Ok(repositories) => repositories,
            Err(error) => {
                // Nothing can be done without the list, whatever the error.
                self.report.failures += 1;
                self.first_failure = Some(format!("listing repositories: {}", error.message()));
                self.stop(error);
                return;
            }
        };
        self.succeeded();
        let mut repositories: Vec<ContainerRepository> = repositories
            .into_iter()
            .filter(|repository| path_regex.is_none_or(|regex| regex.is_match(&repository.path)))
            .collect();
        // Deterministic order (and so deterministic limits) whatever GitLab's listing order.
        repositories.sort_by(|a, b| a.path.cmp(&b.path).then(a.id.cmp(&b.id)));
        repositories.dedup_by_key(|repository| repository.id);

        for (position, repository) in repositories.iter().enumerate() {
            if self.stopped() || self.report.limit_reached {
                self.repositories_not_evaluated = repositories.len() - position;
                break;
            }
            self.report.repositories += 1;
            let mut repository_report = RepositoryReport::for_repository(repository);
            self.clean_repository(repository, rules, &mut repository_report)
                .await;
            self.add_repository(repository_report, true);
        }
    }

    fn project_of(&self, repository: &ContainerRepository) -> Option<PathOrId> {
        if repository.project_id > 0 {
            return Some(PathOrId::Id(repository.project_id));
        }
        match &self.run.target {
            CleanupTarget::Project { project, .. } => Some(project.clone()),
            _ => None,
        }
    }

    async fn clean_repository(
        &mut self,
        repository: &ContainerRepository,
        rules: &CompiledRules,
        report: &mut RepositoryReport,
    ) {
        let Some(project) = self.project_of(repository) else {
            let reason = format!("repository {} has no project id", repository.path);
            report.failures += 1;
            report.skipped = Some(reason.clone());
            self.record_failure(reason);
            return;
        };
        let Some(tags) = self.list_tags(&project, repository, report).await else {
            return;
        };
        let Some(tags) = self
            .complete_details(&project, repository, tags, report)
            .await
        else {
            return;
        };
        let protection = self.protection_of(&project).await;
        let branches = match rules.branch_tags() {
            Some(_) if !self.stopped() => Some(self.branches_of(&project).await),
            _ => None,
        };
        if self.stopped() {
            report.skipped = Some("the run stopped before this repository was evaluated".into());
            return;
        }

        let run = self.run;
        let in_use = match (&run.in_use, run.safety.keep_in_use) {
            (InUse::Known(index), true) => Some(index.repository(&repository.location)),
            _ => None,
        };
        let protected_tags = match &protection {
            ProtectionState::Rules(rules) => rules.clone(),
            ProtectionState::EnforcedByGitLab | ProtectionState::Unknown(_) => {
                ProtectedTags::none()
            }
        };
        let protections = Protections {
            protected_tags,
            in_use,
            keep_shared_digests: run.safety.keep_shared_digests,
            branches: match &branches {
                Some(BranchState::Known(known)) => Some(known.as_ref()),
                _ => None,
            },
        };
        let selection = cleanup::select(&tags, rules, &protections, run.now);
        let counts = selection.counts();
        report.tags_evaluated = counts.evaluated;
        report.tags_kept = counts.kept;
        report.tags_protected =
            counts.kept_by(KeepReason::Protected) + counts.kept_by(KeepReason::InUse);
        report.kept_by_reason = counts
            .kept_by_reason()
            .filter(|(_, count)| *count > 0)
            .collect();
        report.selected = selection.names_to_delete().map(str::to_owned).collect();
        drop(selection);

        // Reasons this repository gets no deletion at all, whatever the permission.
        let blocked = match &protection {
            ProtectionState::Unknown(reason) => Some(format!(
                "tag protection rules unreadable ({reason}): nothing deleted here"
            )),
            _ if in_use.is_some() && repository.location.trim().is_empty() => Some(
                "GitLab reports no location for this repository, so images Pods run cannot be \
                 matched: nothing deleted here"
                    .to_owned(),
            ),
            _ => None,
        };
        if let Some(reason) = blocked {
            if !report.selected.is_empty() {
                report.skipped = Some(reason);
            }
            return;
        }
        if let Some(BranchState::Unknown(reason)) = &branches {
            if !report.selected.is_empty() {
                report.skipped = Some(format!(
                    "branches of project {project} unreadable ({reason}), so keepBranchTags \
                     cannot tell which branches exist: nothing deleted here"
                ));
            }
            return;
        }
        if matches!(protection, ProtectionState::EnforcedByGitLab) && run.safety.keep_shared_digests
        {
            keep_shared_selected_digests(&tags, report);
        }
        if !self.within_deletion_budget(report) {
            return;
        }
        self.delete_selected(&project, repository, report).await;
    }

    /// `maxDeletionPercent`: whether this repository's selection may be deleted (within the
    /// budget or approved); otherwise it is recorded as waiting for approval.
    fn within_deletion_budget(&mut self, report: &mut RepositoryReport) -> bool {
        match cleanup::check_budget(
            &report.path,
            &report.selected,
            report.tags_evaluated,
            self.run.limits.max_deletion_percent,
            &self.run.approved_deletions,
        ) {
            BudgetVerdict::Within => true,
            BudgetVerdict::Approved { fingerprint } => {
                report.approved_fingerprint = Some(fingerprint);
                true
            }
            BudgetVerdict::NeedsApproval(pending) => {
                report.pending_approval = Some(pending);
                false
            }
        }
    }

    /// The project's branches, read once per run and project (`safety.keepBranchTags`).
    async fn branches_of(&mut self, project: &PathOrId) -> BranchState {
        if let Some(known) = self.branches.get(project) {
            return known.clone();
        }
        self.pacer.wait().await;
        let state = match self.client.list_branches_all(project).await {
            Ok(branches) => {
                self.succeeded();
                BranchState::Known(Arc::new(ProjectBranches::from_names(
                    branches.iter().map(|branch| &branch.name),
                )))
            }
            Err(error) => {
                let reason = error.message();
                self.settle_read_error(error, &format!("reading the branches of {project}"));
                BranchState::Unknown(reason)
            }
        };
        self.branches.insert(project.clone(), state.clone());
        state
    }

    /// Every tag of the repository: keyset pagination, or offset pagination when GitLab
    /// refuses keyset (older versions). `None` when the repository cannot be evaluated.
    async fn list_tags(
        &mut self,
        project: &PathOrId,
        repository: &ContainerRepository,
        report: &mut RepositoryReport,
    ) -> Option<Vec<Tag>> {
        self.pacer.wait().await;
        let mut listed = self
            .client
            .list_tags_keyset_all(project, repository.id, SortOrder::Asc)
            .await;
        if let Err(error) = &listed
            && matches!(
                error,
                gitlab::Error::Parameter { .. }
                    | gitlab::Error::Validation { .. }
                    | gitlab::Error::UnexpectedStatus { .. }
            )
        {
            self.pacer.wait().await;
            listed = self.client.list_tags_all(project, repository.id).await;
        }
        match listed {
            Ok(tags) => {
                self.succeeded();
                Some(tags)
            }
            Err(error) => {
                let context = format!("listing tags of {}", repository.path);
                let reason = format!("{context}: {}", error.message());
                match self.settle_read_error(error, &context) {
                    Disposition::Gone => {
                        report.skipped = Some("repository no longer exists".into());
                    }
                    Disposition::Unavailable | Disposition::Failure => {
                        report.failures += 1;
                        report.skipped = Some(reason);
                    }
                    Disposition::Stop => {
                        report.skipped = Some(reason);
                    }
                }
                None
            }
        }
    }

    /// The tags with digest and creation time; details are fetched only for tags whose list
    /// entry lacks one of them. `None` when a detail could not be read: without every tag's
    /// digest, shared-digest protection could miss a kept tag, so nothing is deleted.
    async fn complete_details(
        &mut self,
        project: &PathOrId,
        repository: &ContainerRepository,
        tags: Vec<Tag>,
        report: &mut RepositoryReport,
    ) -> Option<Vec<TagInfo>> {
        let mut infos = Vec::with_capacity(tags.len());
        for tag in tags {
            if let (Some(digest), Some(created_at)) = (&tag.digest, tag.created_at)
                && !digest.is_empty()
            {
                infos.push(TagInfo::new(tag.name, Some(digest), Some(created_at)));
                continue;
            }
            self.pacer.wait().await;
            match self.client.get_tag(project, repository.id, &tag.name).await {
                Ok(details) => {
                    self.succeeded();
                    infos.push(TagInfo {
                        name: tag.name,
                        digest: details.digest,
                        created_at: details.created_at,
                    });
                }
                Err(error) if error.is_not_found() => {
                    // Deleted since it was listed: nothing to decide.
                }
                Err(error) => {
                    let context = format!("reading tag {}:{}", repository.path, tag.name);
                    let reason = format!(
                        "{context}: {}; without every tag's details nothing is deleted here",
                        error.message()
                    );
                    if self.settle_read_error(error, &context) != Disposition::Stop {
                        report.failures += 1;
                    }
                    report.skipped = Some(reason);
                    return None;
                }
            }
        }
        Some(infos)
    }

    /// The project's tag protection rules, read once per run and project.
    async fn protection_of(&mut self, project: &PathOrId) -> ProtectionState {
        if let Some(known) = self.protections.get(project) {
            return known.clone();
        }
        self.pacer.wait().await;
        let state = match self.client.list_tag_protection_rules(project).await {
            Ok(rules) => {
                self.succeeded();
                match ProtectedTags::compile(rules.iter().map(|rule| &rule.tag_name_pattern)) {
                    Ok(compiled) => ProtectionState::Rules(compiled),
                    Err(error) => {
                        let reason = error.to_string();
                        self.record_failure(format!("project {project}: {reason}"));
                        ProtectionState::Unknown(reason)
                    }
                }
            }
            Err(error @ (gitlab::Error::Forbidden { .. } | gitlab::Error::NotFound { .. })) => {
                self.report.notes.push(format!(
                    "tag protection rules of project {project} are not readable ({}): GitLab \
                     still refuses to delete a protected tag, and such refusals are counted as \
                     protected; selected tags sharing a digest with another tag are kept{}",
                    error.message(),
                    if self.permission == DeletePermission::Live {
                        ""
                    } else {
                        "; the tags listed as to be deleted may include protected ones"
                    }
                ));
                ProtectionState::EnforcedByGitLab
            }
            Err(error) => {
                let reason = error.message();
                self.settle_error(error, &format!("reading tag protection rules of {project}"));
                ProtectionState::Unknown(reason)
            }
        };
        self.protections.insert(project.clone(), state.clone());
        state
    }

    /// Deletes (or, simulated, counts) the selected tags of one repository, oldest first.
    async fn delete_selected(
        &mut self,
        project: &PathOrId,
        repository: &ContainerRepository,
        report: &mut RepositoryReport,
    ) {
        let selected = report.selected.clone();
        for name in selected {
            match self.next_deletion() {
                Deletion::Stop => break,
                Deletion::Simulated => {
                    report.deleted.push(name);
                    continue;
                }
                Deletion::Live => {}
            }
            self.pacer.wait().await;
            match self.client.delete_tag(project, repository.id, &name).await {
                Ok(()) => {
                    self.succeeded();
                    self.budget -= 1;
                    report.deleted.push(name);
                }
                Err(error) if is_protected_tag_refusal(&error) => {
                    self.succeeded();
                    report.refused_as_protected += 1;
                    report.tags_kept += 1;
                    report.tags_protected += 1;
                    *report
                        .kept_by_reason
                        .entry(KeepReason::Protected)
                        .or_default() += 1;
                }
                Err(error) => {
                    let context = format!("deleting {}:{name}", repository.path);
                    match self.settle_error(error, &context) {
                        Disposition::Gone => report.already_deleted += 1,
                        Disposition::Unavailable | Disposition::Failure => report.failures += 1,
                        Disposition::Stop => break,
                    }
                }
            }
        }
    }

    /// Adds one repository's counts; `qualify` prefixes sample names with the repository
    /// path (`path:tag`), as tags need and cache entries (already paths) do not.
    fn add_repository(&mut self, repository: RepositoryReport, qualify: bool) {
        let report = &mut self.report;
        report.tags_evaluated += repository.tags_evaluated;
        report.tags_deleted += repository.deleted.len();
        report.tags_kept += repository.tags_kept;
        report.tags_protected += repository.tags_protected;
        report.already_deleted += repository.already_deleted;
        report.withheld += repository.withheld();
        for (reason, count) in &repository.kept_by_reason {
            *report.kept_by_reason.entry(*reason).or_default() += count;
        }
        if let Some(pending) = &repository.pending_approval {
            report.pending_approvals.push(pending.clone());
        }
        for name in &repository.deleted {
            if report.deleted_sample.len() >= DELETED_SAMPLE_SIZE {
                break;
            }
            report.deleted_sample.push(if qualify {
                format!("{}:{name}", repository.path)
            } else {
                name.clone()
            });
        }
        report.repository_reports.push(repository);
    }

    // ---- upstream cache ------------------------------------------------------------------

    async fn run_cache(&mut self, upstream_id: i64, not_downloaded_for: Duration) {
        let mut report = RepositoryReport {
            id: upstream_id,
            path: format!("upstream {upstream_id}"),
            ..RepositoryReport::default()
        };
        self.report.repositories = 1;
        self.pacer.wait().await;
        let entries = match self.client.list_cache_entries_all(upstream_id, None).await {
            Ok(entries) => entries,
            Err(error) => {
                self.report.failures += 1;
                self.first_failure = Some(format!(
                    "listing cache entries of upstream {upstream_id}: {}",
                    error.message()
                ));
                report.skipped = self.first_failure.clone();
                self.stop(error);
                self.add_repository(report, false);
                return;
            }
        };
        self.succeeded();
        let mut unknown_age = 0;
        let infos: Vec<CacheEntryInfo> = entries
            .into_iter()
            .filter_map(|entry| {
                let Some(created_at) = entry.created_at.or(entry.downloaded_at) else {
                    unknown_age += 1;
                    return None;
                };
                Some(CacheEntryInfo {
                    id: entry.id,
                    relative_path: entry.relative_path,
                    downloaded_at: entry.downloaded_at,
                    created_at,
                })
            })
            .collect();
        if unknown_age > 0 {
            self.report.notes.push(format!(
                "{} without created_at or downloaded_at kept: their age is unknown",
                plural(unknown_age, "cache entry")
            ));
        }
        let selection = cleanup::select_expired(&infos, not_downloaded_for, self.run.now);
        report.tags_evaluated = selection.evaluated + unknown_age;
        report.tags_kept = selection.kept + unknown_age;
        let expired: Vec<(String, String)> = selection
            .expired
            .iter()
            .map(|entry| (entry.id.clone(), entry.relative_path.clone()))
            .collect();
        report.selected = expired.iter().map(|(_, path)| path.clone()).collect();

        for (id, relative_path) in expired {
            match self.next_deletion() {
                Deletion::Stop => break,
                Deletion::Simulated => {
                    report.deleted.push(relative_path);
                    continue;
                }
                Deletion::Live => {}
            }
            self.pacer.wait().await;
            match self.client.delete_cache_entry(&id).await {
                Ok(()) => {
                    self.succeeded();
                    self.budget -= 1;
                    report.deleted.push(relative_path);
                }
                Err(error) => {
                    let context = format!("deleting cache entry {relative_path}");
                    match self.settle_error(error, &context) {
                        Disposition::Gone => report.already_deleted += 1,
                        Disposition::Unavailable | Disposition::Failure => report.failures += 1,
                        Disposition::Stop => break,
                    }
                }
            }
        }
        self.add_repository(report, false);
    }

    // ---- outcome -------------------------------------------------------------------------

    fn finish(mut self) -> CleanupReport {
        let simulated = self.report.simulated();
        let withheld_reason = match &self.permission {
            DeletePermission::Withheld(reason) => Some(reason.clone()),
            _ => None,
        };
        let skipped_repositories = self
            .report
            .repository_reports
            .iter()
            .filter(|repository| repository.skipped.is_some())
            .count();
        let report = &mut self.report;
        let is_cache = matches!(self.run.target, CleanupTarget::UpstreamCache { .. });
        let noun = if is_cache { "cache entry" } else { "tag" };
        let unit = if is_cache { "upstream" } else { "repository" };

        let mut sentences = Vec::new();
        let verb = if simulated { "would delete" } else { "deleted" };
        let units = if report.repositories == 1 {
            format!("1 {unit}")
        } else if is_cache {
            format!("{} upstreams", report.repositories)
        } else {
            format!("{} repositories", report.repositories)
        };
        let mut summary = format!(
            "{}{verb} {} of {} evaluated in {units}; kept {}",
            if self.run.dry_run { "dry run: " } else { "" },
            plural_entry(report.tags_deleted, noun),
            report.tags_evaluated,
            report.tags_kept,
        );
        if !report.kept_by_reason.is_empty() {
            let reasons: Vec<String> = report
                .kept_by_reason
                .iter()
                .map(|(reason, count)| format!("{reason} {count}"))
                .collect();
            let _ = write!(summary, " ({})", reasons.join(", "));
        }
        sentences.push(summary);
        if let Some(reason) = &withheld_reason {
            sentences.push(if report.withheld > 0 {
                format!(
                    "{reason}; the rules select {}",
                    plural_entry(report.withheld, noun)
                )
            } else {
                format!("{reason}; the rules select nothing anyway")
            });
        }
        if report.limit_reached {
            let mut sentence = format!(
                "stopped at maxDeletionsPerRun ({})",
                self.run.limits.max_deletions_per_run
            );
            if self.repositories_not_evaluated > 0 {
                let _ = write!(
                    sentence,
                    "; {} not evaluated",
                    if self.repositories_not_evaluated == 1 {
                        format!("1 {unit}")
                    } else {
                        format!("{} repositories", self.repositories_not_evaluated)
                    }
                );
            }
            sentence.push_str("; the next run continues");
            sentences.push(sentence);
        }
        if !report.pending_approvals.is_empty() {
            let percent = self.run.limits.max_deletion_percent.unwrap_or(100);
            let repositories: Vec<String> = report
                .pending_approvals
                .iter()
                .map(|pending| {
                    format!(
                        "{} would lose {} of {} tags (fingerprint {})",
                        pending.repository,
                        pending.would_delete,
                        pending.total,
                        pending.fingerprint
                    )
                })
                .collect();
            sentences.push(format!(
                "over maxDeletionPercent ({percent}%), nothing deleted until approved: {}; \
                 approve with the annotation {}=<fingerprint>[,<fingerprint>…]",
                repositories.join(", "),
                crate::crd::APPROVE_DELETION
            ));
        }
        let approved: Vec<String> = report
            .repository_reports
            .iter()
            .filter_map(|repository| {
                let fingerprint = repository.approved_fingerprint.as_ref()?;
                Some(format!("{} ({fingerprint})", repository.path))
            })
            .collect();
        if !approved.is_empty() {
            sentences.push(format!(
                "over maxDeletionPercent as approved: {}",
                approved.join(", ")
            ));
        }
        if report.already_deleted > 0 {
            sentences.push(format!(
                "{} already gone (deleted by someone else)",
                plural_entry(report.already_deleted, noun)
            ));
        }
        if report.failures > 0 {
            sentences.push(format!(
                "{} failed{}",
                plural(report.failures, "request"),
                self.first_failure
                    .as_ref()
                    .map(|first| format!(", first: {first}"))
                    .unwrap_or_default()
            ));
        }
        if let Some(error) = &report.error {
            sentences.push(format!("stopped: {}", error.message()));
        }
        for repository in report
            .repository_reports
            .iter()
            .filter(|repository| repository.skipped.is_some())
            .take(3)
        {
            if let Some(reason) = &repository.skipped {
                sentences.push(format!("{}: {reason}", repository.path));
            }
        }
        sentences.extend(report.notes.iter().cloned());
        report.message = sentences.join("; ");

        report.outcome = if report.error.is_some() {
            if report.tags_deleted > 0 {
                RunOutcome::Partial
            } else {
                RunOutcome::Failed
            }
        } else if !report.pending_approvals.is_empty() {
            RunOutcome::NeedsApproval
        } else if report.failures > 0
            || report.limit_reached
            || report.withheld > 0
            || skipped_repositories > 0
        {
            RunOutcome::Partial
        } else {
            RunOutcome::Succeeded
        };
        self.report
    }
}

/// Keeps every selected tag whose digest another tag of the repository also has, when the
/// protection rules are unknown: GitLab may refuse to delete one of them as protected, and
/// whichever went first, `keepSharedDigests` would then have been broken. Counted as kept,
/// [`KeepReason::SharedDigest`].
fn keep_shared_selected_digests(tags: &[TagInfo], report: &mut RepositoryReport) {
    let mut digest_users: HashMap<&str, usize> = HashMap::new();
    for digest in tags.iter().filter_map(|tag| tag.digest.as_deref()) {
        *digest_users.entry(digest).or_default() += 1;
    }
    let digest_of: HashMap<&str, &str> = tags
        .iter()
        .filter_map(|tag| Some((tag.name.as_str(), tag.digest.as_deref()?)))
        .collect();
    let before = report.selected.len();
    report.selected.retain(|name| {
        digest_of
            .get(name.as_str())
            .is_none_or(|digest| digest_users.get(digest).copied().unwrap_or(0) < 2)
    });
    let kept = before - report.selected.len();
    if kept > 0 {
        report.tags_kept += kept;
        *report
            .kept_by_reason
            .entry(KeepReason::SharedDigest)
            .or_default() += kept;
    }
}

fn plural_entry(count: usize, noun: &str) -> String {
    if noun == "cache entry" {
        if count == 1 {
            "1 cache entry".to_owned()
        } else {
            format!("{count} cache entries")
        }
    } else {
        plural(count, noun)
    }
}

// ---- GitLabPolicy --------------------------------------------------------------------------

/// The project cleanup policy GitLab should run (strategy `GitLabPolicy`). Always enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredGitLabPolicy {
    pub cadence: GitLabCadence,
    /// One of 1, 5, 10, 25, 50, 100; `None`: no limit.
    pub keep_n: Option<i32>,
    /// One of 7d, 14d, 30d, 90d; `None`: no age limit.
    pub older_than: Option<String>,
    /// GitLab's `name_regex` (the delete regex); required.
    pub name_regex_delete: Option<String>,
    pub name_regex_keep: Option<String>,
}

impl DesiredGitLabPolicy {
    /// From a `CleanupPolicy` spec; a missing cadence is [`Error::InvalidSpec`].
    pub fn from_spec(spec: &CleanupPolicySpec) -> Result<Self> {
        let cadence = spec.cadence.ok_or_else(|| {
            Error::InvalidSpec(format!(
                "{FIELD_CADENCE} is required with strategy GitLabPolicy"
            ))
        })?;
        let rules = spec.rules.clone().unwrap_or(TagRules {
            name_regex_delete: None,
            name_regex_keep: None,
            keep_n: None,
            older_than: None,
            keep_n_per_family: None,
        });
        Ok(Self {
            cadence,
            keep_n: rules.keep_n,
            older_than: rules.older_than,
            name_regex_delete: rules.name_regex_delete,
            name_regex_keep: rules.name_regex_keep,
        })
    }
}

/// The policy in GitLab's terms, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PolicyValues {
    cadence: &'static str,
    keep_n: Option<i64>,
    older_than: Option<&'static str>,
    name_regex: String,
    name_regex_keep: Option<String>,
    notes: Vec<String>,
}

fn policy_values(desired: &DesiredGitLabPolicy) -> Result<PolicyValues> {
    let keep_n = desired
        .keep_n
        .map(|keep_n| GitLabKeepN::try_from(keep_n).map_err(Error::InvalidSpec))
        .transpose()?
        .map(|keep_n| keep_n as i64);
    let older_than = desired
        .older_than
        .as_deref()
        .map(|older_than| GitLabOlderThan::try_from(older_than).map_err(Error::InvalidSpec))
        .transpose()?
        .map(GitLabOlderThan::as_gitlab);
    // The regexes must be valid RE2 and the delete regex non-blank, as GitLab checks.
    let compiled = CompiledRules::compile(&RuleSpec {
        name_regex_delete: desired.name_regex_delete.clone(),
        name_regex_keep: desired.name_regex_keep.clone(),
        keep_n: None,
        older_than: None,
        ..RuleSpec::default()
    })
    .map_err(|error| Error::InvalidSpec(error.to_string()))?;
    Ok(PolicyValues {
        cadence: desired.cadence.as_gitlab(),
        keep_n,
        older_than,
        name_regex: compiled.name_regex_delete().to_owned(),
        name_regex_keep: compiled.name_regex_keep().map(str::to_owned),
        notes: compiled.notes().to_vec(),
    })
}

/// What [`sync_gitlab_policy`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyOutcome {
    /// The policy as GitLab has it now (after the PUT; in plan mode, before it).
    pub policy: Option<ContainerExpirationPolicy>,
    /// When GitLab runs it next (`status.nextRunTime`).
    pub next_run_at: Option<Timestamp>,
    /// `Updated` with the changed fields, when the policy differed (in plan mode: would).
    pub action: Option<Action>,
    /// Remarks about how GitLab reads the regexes.
    pub notes: Vec<String>,
}

/// Makes the project's GitLab cleanup policy match `desired`: reads it, and sends one
/// `PUT /projects/:id` with only the differing fields, or nothing when it matches (or in
/// [`Mode::Plan`]). An invalid `keepN`, `olderThan` or regex is [`Error::InvalidSpec`] before
/// any request.
pub async fn sync_gitlab_policy(
    client: &GitLabClient,
    project: &PathOrId,
    desired: &DesiredGitLabPolicy,
    mode: Mode,
) -> Result<PolicyOutcome> {
    let values = policy_values(desired)?;
    let current = client.get_cleanup_policy(project).await?;
    let (update, changes) = policy_difference(current.as_ref(), &values);
    if changes.is_empty() {
        return Ok(PolicyOutcome {
            next_run_at: current.as_ref().and_then(|policy| policy.next_run_at),
            policy: current,
            action: None,
            notes: values.notes,
        });
    }
    let (policy, message) = if mode.writes() {
        let updated = client.update_cleanup_policy(project, &update).await?;
        (
            updated,
            format!("updated the GitLab cleanup policy of project {project}"),
        )
    } else {
        (
            current,
            format!("would update the GitLab cleanup policy of project {project}"),
        )
    };
    Ok(PolicyOutcome {
        next_run_at: policy.as_ref().and_then(|policy| policy.next_run_at),
        policy,
        action: Some(Action::new(Reason::Updated.as_str(), message).with_changes(changes)),
        notes: values.notes,
    })
}

/// The fields to send and their changes. A blank keep regex reads as none.
fn policy_difference(
    current: Option<&ContainerExpirationPolicy>,
    desired: &PolicyValues,
) -> (ContainerExpirationPolicyUpdate, Vec<FieldChange>) {
    let mut update = ContainerExpirationPolicyUpdate::default();
    let mut changes = Vec::new();
    let current_cadence = current.map(|policy| policy.cadence.as_str());
    if current_cadence != Some(desired.cadence) {
        changes.push(FieldChange::new(
            "cadence",
            current_cadence,
            Some(desired.cadence),
        ));
        update.cadence = Some(desired.cadence.to_owned());
    }
    let current_enabled = current.map(|policy| policy.enabled);
    if current_enabled != Some(true) {
        changes.push(FieldChange::new("enabled", current_enabled, Some(true)));
        update.enabled = Some(true);
    }
    let current_keep_n = current.and_then(|policy| policy.keep_n);
    if current.is_none() || current_keep_n != desired.keep_n {
        changes.push(FieldChange::new("keepN", current_keep_n, desired.keep_n));
        update.keep_n = Some(desired.keep_n);
    }
    let current_older_than = current.and_then(|policy| policy.older_than.as_deref());
    if current.is_none() || current_older_than != desired.older_than {
        changes.push(FieldChange::new(
            "olderThan",
            current_older_than,
            desired.older_than,
        ));
        update.older_than = Some(desired.older_than.map(str::to_owned));
    }
    let current_delete = current.and_then(|policy| policy.name_regex.as_deref());
    if current_delete != Some(desired.name_regex.as_str()) {
        changes.push(FieldChange::new(
            "nameRegexDelete",
            current_delete,
            Some(&desired.name_regex),
        ));
        update.name_regex = Some(desired.name_regex.clone());
    }
    let current_keep = current
        .and_then(|policy| policy.name_regex_keep.as_deref())
        .filter(|keep| !keep.is_empty());
    let desired_keep = desired
        .name_regex_keep
        .as_deref()
        .filter(|keep| !keep.is_empty());
    if current_keep != desired_keep {
        changes.push(FieldChange::new(
            "nameRegexKeep",
            current_keep,
            desired_keep,
        ));
        // GitLab takes a blank keep regex as "keep nothing by name".
        update.name_regex_keep = Some(desired_keep.unwrap_or_default().to_owned());
    }
    (update, changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden(message: &str) -> gitlab::Error {
        gitlab::Error::Forbidden {
            message: message.into(),
        }
    }

    fn policy(keep_regex: Option<&str>) -> ContainerExpirationPolicy {
        ContainerExpirationPolicy {
            cadence: "7d".into(),
            enabled: true,
            keep_n: Some(10),
            older_than: Some("14d".into()),
            name_regex: Some(".*".into()),
            name_regex_keep: keep_regex.map(str::to_owned),
            next_run_at: None,
        }
    }

    fn desired(keep_regex: Option<&str>) -> PolicyValues {
        policy_values(&DesiredGitLabPolicy {
            cadence: GitLabCadence::Weekly,
            keep_n: Some(10),
            older_than: Some("14d".into()),
            name_regex_delete: Some(".*".into()),
            name_regex_keep: keep_regex.map(str::to_owned),
        })
        .expect("valid")
    }

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
    fn errors_sort_into_what_a_run_does_next() {
        assert!(is_protected_tag_refusal(&forbidden(
            "403 Forbidden - cannot delete protected tag(s)"
        )));
        assert!(is_protected_tag_refusal(&forbidden("403 Forbidden")));
        let cases = [
            (forbidden("403 Forbidden"), Disposition::Stop),
            (
                gitlab::Error::Unauthorized {
                    message: "401 Unauthorized".into(),
                },
                Disposition::Stop,
            ),
            (
                gitlab::Error::RateLimited {
                    retry_after: Some(Duration::from_secs(600)),
                    message: "Retry later".into(),
                },
                Disposition::Stop,
            ),
            (
                gitlab::Error::NotFound {
                    message: "404 Tag Not Found".into(),
                },
                Disposition::Gone,
            ),
            (
                gitlab::Error::Server {
                    status: 502,
                    message: "Bad Gateway".into(),
                },
                Disposition::Unavailable,
            ),
            (
                gitlab::Error::Timeout {
                    method: "DELETE".into(),
                    route: TAG_ROUTE_FOR_TESTS.into(),
                },
                Disposition::Unavailable,
            ),
            (
                gitlab::Error::Parameter {
                    message: "bad".into(),
                },
                Disposition::Failure,
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(disposition(&error), expected, "{error}");
        }
    }

    const TAG_ROUTE_FOR_TESTS: &str =
        "/projects/:id/registry/repositories/:repository_id/tags/:tag_name";

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

    #[test]
    fn policy_difference_sends_only_what_differs() {
        let (update, changes) = policy_difference(Some(&policy(None)), &desired(None));
        assert!(changes.is_empty());
        assert_eq!(update, ContainerExpirationPolicyUpdate::default());
        // A blank keep regex is no keep regex.
        let (_, changes) = policy_difference(Some(&policy(Some(""))), &desired(None));
        assert!(changes.is_empty());

        let mut drifted = policy(Some("main"));
        drifted.keep_n = None;
        drifted.enabled = false;
        let (update, changes) = policy_difference(Some(&drifted), &desired(None));
        assert_eq!(
            update,
            ContainerExpirationPolicyUpdate {
                enabled: Some(true),
                keep_n: Some(Some(10)),
                name_regex_keep: Some(String::new()),
                ..ContainerExpirationPolicyUpdate::default()
            }
        );
        assert_eq!(
            changes,
            vec![
                FieldChange::new("enabled", Some(false), Some(true)),
                FieldChange::new("keepN", None::<i64>, Some(10)),
                FieldChange::new("nameRegexKeep", Some("main"), None::<&str>),
            ]
        );

        let (update, changes) = policy_difference(None, &desired(Some("main")));
        assert_eq!(changes.len(), 6);
        assert_eq!(update.older_than, Some(Some("14d".to_owned())));
    }

    #[test]
    fn gitlab_policy_values_are_gitlabs_own() {
        let base = DesiredGitLabPolicy {
            cadence: GitLabCadence::Monthly,
            keep_n: None,
            older_than: None,
            name_regex_delete: Some("v.*".into()),
            name_regex_keep: None,
        };
        let values = policy_values(&base).expect("valid");
        assert_eq!(
            (values.cadence, values.keep_n, values.older_than),
            ("1month", None, None)
        );
        for keep_n in [0, 2, 1000] {
            let error = policy_values(&DesiredGitLabPolicy {
                keep_n: Some(keep_n),
                ..base.clone()
            })
            .expect_err("not GitLab's");
            assert_eq!(error.reason(), "InvalidSpec");
        }
        let error = policy_values(&DesiredGitLabPolicy {
            older_than: Some("1month".into()),
            ..base.clone()
        })
        .expect_err("not GitLab's");
        assert!(error.message().contains("olderThan"), "{error}");
    }

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

    #[tokio::test]
    async fn the_pacer_spaces_requests() {
        // Only a lower bound: a slow machine can make it longer, never shorter.
        let mut pacer = Pacer::new(20);
        let started = tokio::time::Instant::now();
        for _ in 0..4 {
            pacer.wait().await;
        }
        assert!(started.elapsed() >= Duration::from_millis(150));
    }
}
