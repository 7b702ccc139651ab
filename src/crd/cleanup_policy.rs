//! The `CleanupPolicy` kind: scheduled cleanup of container registry tags (of one project or
//! every project in a group) or of an upstream's cache entries.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{GitLabConnection, LocalObjectReference, default_true};

/// How many names a run reports in `status.lastRun.deletedSample`.
pub const DELETED_SAMPLE_SIZE: usize = 20;

/// Desired cleanup: what to clean, by which rules, when, and how carefully.
// Each printcolumn(...) repeats `type_ = ...`, which clippy reads as a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "gitlabregistry.io",
    version = "v1alpha1",
    kind = "CleanupPolicy",
    namespaced,
    status = "CleanupPolicyStatus",
    shortname = "tagcleanup",
    category = "gitlabregistry",
    doc = "A scheduled cleanup of GitLab container registry tags or of an upstream's cache entries.",
    printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    // Times that can lie ahead are strings (RFC 3339): kubectl prints a `date` column as an
    // age, and a future time as `<invalid>`. Only `Age` is a date.
    printcolumn(
        name = "Last run",
        type_ = "string",
        json_path = ".status.lastRun.completionTime"
    ),
    printcolumn(
        name = "Deleted",
        type_ = "integer",
        json_path = ".status.lastRun.tagsDeleted"
    ),
    printcolumn(
        name = "Next run",
        type_ = "string",
        json_path = ".status.nextRunTime"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.target.containerRepositories) || (has(self.rules) && has(self.rules.nameRegexDelete))").message("a containerRepositories target needs rules.nameRegexDelete (use \".*\" for all tags)"),
    validation = Rule::new("!has(self.target.upstreamCache) || has(self.cacheRules)").message("an upstreamCache target needs cacheRules"),
    validation = Rule::new("self.strategy != 'GitLabPolicy' || (has(self.target.containerRepositories) && has(self.target.containerRepositories.project))").message("strategy GitLabPolicy needs a containerRepositories target with a project (GitLab's policies are per project)"),
    validation = Rule::new("self.strategy != 'GitLabPolicy' || has(self.cadence)").message("strategy GitLabPolicy needs a cadence"),
    validation = Rule::new("self.strategy != 'GitLabPolicy' || !has(self.rules) || !has(self.rules.keepN) || self.rules.keepN in [1, 5, 10, 25, 50, 100]").message("with strategy GitLabPolicy, keepN must be one of 1, 5, 10, 25, 50, 100"),
    validation = Rule::new("self.strategy != 'GitLabPolicy' || !has(self.rules) || !has(self.rules.olderThan) || self.rules.olderThan in ['7d', '14d', '30d', '90d']").message("with strategy GitLabPolicy, olderThan must be one of 7d, 14d, 30d, 90d"),
    validation = Rule::new("self.strategy != 'GitLabPolicy' || ((!has(self.rules) || !has(self.rules.keepNPerFamily)) && (!has(self.safety) || !has(self.safety.keepBranchTags)) && (!has(self.limits) || !has(self.limits.maxDeletionPercent)))").message("rules.keepNPerFamily, safety.keepBranchTags and limits.maxDeletionPercent need strategy Operator (GitLab's own policy has no such rules)")
)]
pub struct CleanupPolicySpec {
    /// When runs start: a 5-field cron expression (minute hour day-of-month month day-of-week),
    /// e.g. `0 3 * * *`. Used by strategy `Operator`.
    #[serde(default = "default_schedule")]
    #[schemars(length(min = 1))]
    pub schedule: String,
    /// IANA time zone the schedule is read in, e.g. `Europe/Berlin`.
    #[serde(default = "default_time_zone")]
    pub time_zone: String,
    /// Stop scheduling runs while true (a run in progress finishes).
    #[serde(default)]
    pub suspend: bool,
    /// Evaluate and report what would be deleted, without deleting anything.
    #[serde(default)]
    pub dry_run: bool,
    /// What to clean: exactly one of `containerRepositories` or `upstreamCache`.
    pub target: CleanupTarget,
    /// Tag rules for a `containerRepositories` target, evaluated as GitLab documents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<TagRules>,
    /// Cache entry rules for an `upstreamCache` target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_rules: Option<CacheRules>,
    /// Protections on top of the rules: tags that are never deleted.
    #[serde(default)]
    pub safety: Safety,
    /// Who runs the cleanup: the operator on `schedule`, or GitLab's own per-project policy.
    #[serde(default)]
    pub strategy: CleanupStrategy,
    /// How often GitLab runs its policy (strategy `GitLabPolicy` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cadence: Option<GitLabCadence>,
    /// Bounds on one run.
    #[serde(default)]
    pub limits: Limits,
    /// GitLab connection for this object; unset: the operator's default connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gitlab: Option<GitLabConnection>,
}

fn default_schedule() -> String {
    "0 3 * * *".into()
}

fn default_time_zone() -> String {
    "UTC".into()
}

/// What a cleanup works on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.containerRepositories) != has(self.upstreamCache)").message("exactly one of containerRepositories or upstreamCache must be set"))]
pub struct CleanupTarget {
    /// The container repositories of one project or of every project in a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_repositories: Option<ContainerRepositoriesTarget>,
    /// The cache entries of one upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_cache: Option<UpstreamCacheTarget>,
}

/// Container repositories of a project, or of every project in a group.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.project) != has(self.group)").message("exactly one of project or group must be set"))]
pub struct ContainerRepositoriesTarget {
    /// Project: full path (`my-org/app`) or numeric id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Group: full path or numeric id; every container repository of every project in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Only repositories whose path (`my-org/app/api`) matches this RE2 regex, anchored at
    /// both ends. Unset: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
}

/// The cache of one upstream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamCacheTarget {
    /// The `Upstream` object, in this namespace, whose cache is cleaned.
    pub upstream_ref: LocalObjectReference,
}

/// GitLab's tag rules. Regexes are RE2 and implicitly anchored at both ends.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TagRules {
    /// Tags whose names match are candidates for deletion, e.g. `.*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub name_regex_delete: Option<String>,
    /// Tags whose names match are always kept, e.g. `main|stable-.*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_regex_keep: Option<String>,
    /// Always keep this many of the newest matching tags per repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub keep_n: Option<i32>,
    /// Only delete tags older than this, e.g. `14d`, `1month`, `12h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[1-9][0-9]*\\\\s*[a-z]+$')").message("olderThan must be a positive duration such as 14d, 1month or 12h"))]
    pub older_than: Option<String>,
    /// Operator rule, after GitLab's: group the tags whose names match `pattern` by the text
    /// its one capture group captures, and keep the `n` newest of every group (strategy
    /// `Operator` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_n_per_family: Option<KeepNPerFamily>,
}

/// Keep the newest tags of every family of tags, e.g. the two newest builds of every branch.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.n >= 1").message("keepNPerFamily.n must be at least 1"))]
pub struct KeepNPerFamily {
    /// RE2 regex with exactly one capture group, anchored at both ends like the other
    /// regexes; the captured text names the family, e.g. `(.+)-[0-9a-f]{8}`.
    #[schemars(length(min = 1))]
    pub pattern: String,
    /// How many of the newest tags of every family to keep; at least 1.
    #[schemars(range(min = 1))]
    pub n: i32,
}

/// Rules for an upstream's cache entries.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheRules {
    /// Delete entries not downloaded for this long (entries never downloaded count from
    /// their creation), e.g. `30d`.
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[1-9][0-9]*\\\\s*[a-z]+$')").message("notDownloadedFor must be a positive duration such as 30d"))]
    pub not_downloaded_for: String,
}

/// Protections applied on top of the rules.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Safety {
    /// Never delete a tag that a Pod in this cluster runs, by tag or by digest. Where no
    /// cluster is reachable, a run with this set deletes nothing.
    #[serde(default = "default_true")]
    pub keep_in_use: bool,
    /// Never delete a tag whose digest a kept tag also points to.
    #[serde(default = "default_true")]
    pub keep_shared_digests: bool,
    /// Never delete a tag built from a branch that still exists in its project (strategy
    /// `Operator` only). Where the branches cannot be read, that project deletes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_branch_tags: Option<KeepBranchTags>,
}

impl Default for Safety {
    fn default() -> Self {
        Self {
            keep_in_use: true,
            keep_shared_digests: true,
            keep_branch_tags: None,
        }
    }
}

/// Which part of a tag name is the branch it was built from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeepBranchTags {
    /// RE2 regex with exactly one capture group, anchored at both ends; a tag whose captured
    /// text equals the `CI_COMMIT_REF_SLUG` of an existing branch is kept, e.g.
    /// `(.+)-[0-9a-f]{8}` for tags `$CI_COMMIT_REF_SLUG-$CI_COMMIT_SHORT_SHA`.
    #[schemars(length(min = 1))]
    pub pattern: String,
}

/// Who runs the cleanup.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum CleanupStrategy {
    /// The operator evaluates the rules and deletes tags on `schedule`.
    #[default]
    Operator,
    /// The operator writes the rules into the project's GitLab cleanup policy and GitLab runs it
    /// every `cadence`.
    GitLabPolicy,
}

/// GitLab's allowed cleanup policy cadences.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum GitLabCadence {
    /// Every day.
    #[serde(rename = "1d")]
    Daily,
    /// Every week.
    #[serde(rename = "7d")]
    Weekly,
    /// Every two weeks.
    #[serde(rename = "14d")]
    Fortnightly,
    /// Every month.
    #[serde(rename = "1month")]
    Monthly,
    /// Every three months.
    #[serde(rename = "3month")]
    Quarterly,
}

impl GitLabCadence {
    /// The value GitLab's API takes.
    pub fn as_gitlab(self) -> &'static str {
        match self {
            Self::Daily => "1d",
            Self::Weekly => "7d",
            Self::Fortnightly => "14d",
            Self::Monthly => "1month",
            Self::Quarterly => "3month",
        }
    }
}

/// The `keep_n` values GitLab's project cleanup policy accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GitLabKeepN {
    One = 1,
    Five = 5,
    Ten = 10,
    TwentyFive = 25,
    Fifty = 50,
    Hundred = 100,
}

impl TryFrom<i32> for GitLabKeepN {
    type Error = String;

    fn try_from(value: i32) -> Result<Self, Self::Error> {
        Ok(match value {
            1 => Self::One,
            5 => Self::Five,
            10 => Self::Ten,
            25 => Self::TwentyFive,
            50 => Self::Fifty,
            100 => Self::Hundred,
            other => {
                return Err(format!(
                    "keepN {other} is not one of GitLab's values 1, 5, 10, 25, 50, 100"
                ));
            }
        })
    }
}

/// The `older_than` values GitLab's project cleanup policy accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GitLabOlderThan {
    SevenDays,
    FourteenDays,
    ThirtyDays,
    NinetyDays,
}

impl GitLabOlderThan {
    /// The value GitLab's API takes.
    pub fn as_gitlab(self) -> &'static str {
        match self {
            Self::SevenDays => "7d",
            Self::FourteenDays => "14d",
            Self::ThirtyDays => "30d",
            Self::NinetyDays => "90d",
        }
    }
}

impl TryFrom<&str> for GitLabOlderThan {
    type Error = String;

    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Ok(match value.trim() {
            "7d" => Self::SevenDays,
            "14d" => Self::FourteenDays,
            "30d" => Self::ThirtyDays,
            "90d" => Self::NinetyDays,
            other => {
                return Err(format!(
                    "olderThan {other:?} is not one of GitLab's values 7d, 14d, 30d, 90d"
                ));
            }
        })
    }
}

/// Bounds on one run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// At most this many deletions per run; a run that reaches it reports `Partial` and the
    /// next run continues.
    #[serde(default = "default_max_deletions_per_run")]
    #[schemars(range(min = 1))]
    pub max_deletions_per_run: i32,
    /// At most this many GitLab requests per second during a run.
    #[serde(default = "default_requests_per_second")]
    #[schemars(range(min = 1))]
    pub requests_per_second: i32,
    /// A repository where a run would delete more than this percentage of its tags deletes
    /// nothing until the exact set is approved with the annotation
    /// `gitlabregistry.io/approve-deletion` (1..100; strategy `Operator` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_deletion_percent: Option<i32>,
}

fn default_max_deletions_per_run() -> i32 {
    1000
}

fn default_requests_per_second() -> i32 {
    10
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_deletions_per_run: default_max_deletions_per_run(),
            requests_per_second: default_requests_per_second(),
            max_deletion_percent: None,
        }
    }
}

/// Observed state of the cleanup policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CleanupPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the next run is due (for `GitLabPolicy`: GitLab's `next_run_at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run_time: Option<Time>,
    /// The schedule slot the last run was started for; a missed slot runs once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// The last run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<RunSummary>,
    /// Last value of the `gitlabregistry.io/run-requested-at` annotation acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_run_request: Option<String>,
    /// `Ready` and `Synced`.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Counts and a sample of one run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    /// When the run started.
    pub start_time: Time,
    /// When the run ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// How the run ended.
    pub outcome: RunOutcome,
    /// Whether this was a dry run (nothing deleted; `tagsDeleted` counts what would go).
    #[serde(default)]
    pub dry_run: bool,
    /// Repositories (or, for an upstream cache, upstreams) looked at.
    pub repositories: i64,
    /// Tags (or cache entries) evaluated.
    pub tags_evaluated: i64,
    /// Tags (or cache entries) deleted, or that a dry run would delete.
    pub tags_deleted: i64,
    /// Tags kept by the rules or protections.
    pub tags_kept: i64,
    /// Tags kept because GitLab protects them or a Pod runs them.
    pub tags_protected: i64,
    /// Deletions or listings that failed.
    pub failures: i64,
    /// Up to 20 of the deleted names (`repository:tag`).
    #[serde(default)]
    #[schemars(length(max = 20))]
    pub deleted_sample: Vec<String>,
    /// Why the run ended as it did, for a run that was not `Succeeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Kept tags by reason (`KeepN`, `KeepNPerFamily`, `BranchExists`, …), only reasons that
    /// occurred.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub kept_by_reason: BTreeMap<String, i64>,
    /// Repositories over `limits.maxDeletionPercent` whose deletions wait for approval.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_approval: Vec<PendingApproval>,
}

/// A repository's deletions that wait for a person: annotate the policy with
/// `gitlabregistry.io/approve-deletion=<fingerprint>` to let the next run delete exactly them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingApproval {
    /// Repository path, e.g. `my-org/app/api`.
    pub repository: String,
    /// Tags the run would delete there.
    pub would_delete: i64,
    /// Tags the repository has.
    pub total: i64,
    /// Short hash of the repository and the exact set of tags to delete.
    pub fingerprint: String,
}

/// How a run ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RunOutcome {
    /// Everything the rules selected was handled.
    Succeeded,
    /// Stopped at `maxDeletionsPerRun` or by failures; the next run continues.
    Partial,
    /// Nothing could be done (for example GitLab unreachable).
    Failed,
    /// A repository would lose more than `limits.maxDeletionPercent` of its tags: nothing was
    /// deleted there until the plan is approved (`status.lastRun.pendingApproval`).
    NeedsApproval,
}

impl RunOutcome {
    /// Stable CamelCase name, for metrics labels, Events and output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "Succeeded",
            Self::Partial => "Partial",
            Self::Failed => "Failed",
            Self::NeedsApproval => "NeedsApproval",
        }
    }
}
