//! The run engine: [`run_cleanup`] lists a target's repositories or cache entries, asks the
//! pure `cleanup` module what goes, and deletes it paced, limited and only when permitted.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;
use tokio::time::{Interval, MissedTickBehavior};

use super::report::plural;
use super::{
    CleanupReport, CleanupRun, CleanupTarget, DeletePermission, InUse, MAX_CONSECUTIVE_UNAVAILABLE,
    RepositoryReport, Validated, compile, delete_permission,
};
use crate::cleanup::{
    self, BudgetVerdict, CacheEntryInfo, CompiledRules, KeepReason, ProjectBranches, ProtectedTags,
    Protections, TagInfo,
};
use crate::crd::cleanup_policy::{DELETED_SAMPLE_SIZE, RunOutcome};
use crate::gitlab::{
    self, ContainerRepository, GitLabClient, PathOrId, RepositoryListRequest, SortOrder, Tag,
};
use crate::sync::{Error, Result};

/// What the deletion loop may do next.
enum Deletion {
    Stop,
    /// Counted as deleted, not sent.
    Simulated,
    /// Sent; the caller takes the budget when GitLab confirms.
    Live,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden(message: &str) -> gitlab::Error {
        gitlab::Error::Forbidden {
            message: message.into(),
        }
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
