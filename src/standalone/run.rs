//! One standalone pass over the manifests: registries first (upstreams are created through
//! them), then upstreams, then registries again (their upstreams now have ids), then cleanup
//! policies. `plan` sends only GET requests and reports what `apply` would change.
//!
//! Every object's report says what happens to it (`action`: create, update, delete, no
//! change, or blocked with the reason) and, only when it exists in GitLab, whether it is
//! Ready. Upstream passwords that are `export`'s placeholder are never sent to GitLab.

use crate::crd::reasons::Reason;
use crate::resolve::{self, GitLabId, RegistryFacts, UpstreamFacts, World};
use std::collections::{BTreeMap, BTreeSet};

use kube::ResourceExt;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use super::manifests::{Manifest, Manifests, environment_variable};
use crate::controller::connection::secret_key;
use crate::crd::conditions::{self, SYNCED, Status};
use crate::crd::upstream::{PLACEHOLDER_PASSWORD, REASON_PLACEHOLDER_PASSWORD};
use crate::crd::{
    CleanupPolicy, CleanupStrategy, Upstream, VirtualRegistry, conditions::ConditionUpdate,
};
use crate::gitlab::{GitLabClient, PathOrId, UpstreamCredentials};
use crate::sync::registry::{self, RegistryOutcome, Resolution};
use crate::sync::upstream::{self, CredentialsVersion, ResolvedCredentials, UpstreamOutcome};
use crate::sync::{Action, Mode};

/// What one object came to.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectReport {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub source: String,
    pub gitlab_id: Option<i64>,
    /// What `apply` does (or did) to the object: `create`, `update`, `delete` (tags or cache
    /// entries of a cleanup run), `no change`, or `blocked: <reason>`.
    pub action: String,
    /// Whether the object is Ready; `None` while it does not exist in GitLab (a plan that
    /// would create it, an apply that could not).
    pub ready: Option<bool>,
    pub reason: String,
    pub message: String,
    pub conditions: Vec<ConditionView>,
    pub actions: Vec<ActionView>,
    /// Extra lines (pull prefix, cleanup counts, …).
    pub details: Vec<String>,
    /// A cleanup's repositories over `maxDeletionPercent`, waiting for `--approve`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pending_approval: Vec<crate::crd::cleanup_policy::PendingApproval>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConditionView {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ActionView {
    pub reason: String,
    pub message: String,
    pub writes: bool,
    pub changes: Vec<ChangeView>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangeView {
    pub field: String,
    pub from: Option<String>,
    pub to: Option<String>,
}

impl From<&Action> for ActionView {
    fn from(action: &Action) -> Self {
        Self {
            reason: action.reason.into(),
            message: action.message.clone(),
            writes: action.writes,
            changes: action
                .changes
                .iter()
                .map(|c| ChangeView {
                    field: c.field.into(),
                    from: c.from.clone(),
                    to: c.to.clone(),
                })
                .collect(),
        }
    }
}

impl ObjectReport {
    pub(super) fn new(kind: &str, namespace: String, name: String, source: &str) -> Self {
        Self {
            kind: kind.into(),
            namespace,
            name,
            source: source.into(),
            gitlab_id: None,
            action: String::new(),
            ready: None,
            reason: String::new(),
            message: String::new(),
            conditions: Vec::new(),
            actions: Vec::new(),
            details: Vec::new(),
            pending_approval: Vec::new(),
        }
    }

    /// Concludes with `Synced=False` (and so `Ready=False`) for `reason`: the object could not
    /// be reconciled, and says why.
    pub(super) fn not_synced(&mut self, reason: &str, message: String, mode: Mode, exists: bool) {
        self.conclude(
            vec![ConditionUpdate::new(
                SYNCED,
                false,
                reason.to_owned(),
                message,
            )],
            &[SYNCED],
            mode,
            exists,
        );
    }

    /// Sets the conditions, derives Ready from `components` and the action from the
    /// conditions and what was (or would be) written. `exists`: the object is in GitLab
    /// after this pass.
    pub(super) fn conclude(
        &mut self,
        updates: Vec<ConditionUpdate>,
        components: &[&'static str],
        mode: Mode,
        exists: bool,
    ) {
        let now = crate::controller::status::now();
        let blocked_by = updates
            .iter()
            .find(|update| {
                [SYNCED, conditions::UPSTREAMS_RESOLVED].contains(&update.type_)
                    && update.status != Status::True
            })
            .map(|update| update.reason.clone());
        let mut all = Vec::new();
        for update in updates {
            conditions::set_condition(&mut all, update, None, &now);
        }
        let mut ready = conditions::ready_summary(&all, components);
        self.action = match blocked_by {
            Some(reason) => format!("blocked: {reason}"),
            None => self.planned_action().to_owned(),
        };
        // A plan changes nothing: what it would create or update is not in line with the
        // spec yet, whatever the engines say of the plan itself.
        if !mode.writes()
            && let Some(pending) = self.pending_summary()
        {
            ready = pending;
        }
        self.ready = exists.then_some(ready.status == Status::True);
        self.reason = ready.reason.clone();
        self.message = ready.message.clone();
        conditions::set_condition(&mut all, ready, None, &now);
        self.conditions = all
            .into_iter()
            .map(|c| ConditionView {
                type_: c.type_,
                status: c.status,
                reason: c.reason,
                message: c.message,
            })
            .collect();
    }

    /// For a plan: the Ready condition of an object the plan would create or update.
    /// A cleanup run's deletions are the policy's work, not a difference from its spec.
    fn pending_summary(&self) -> Option<ConditionUpdate> {
        let pending: Vec<&ActionView> = self.actions.iter().filter(|a| a.writes).collect();
        let first = pending.first()?;
        match self.action.as_str() {
            "create" => Some(ConditionUpdate::new(
                conditions::READY,
                false,
                Reason::NotCreated.as_str(),
                first.message.clone(),
            )),
            "update" => {
                let fields: Vec<&str> = pending
                    .iter()
                    .flat_map(|a| a.changes.iter().map(|c| c.field.as_str()))
                    .collect();
                Some(ConditionUpdate::new(
                    conditions::READY,
                    false,
                    Reason::OutOfSync.as_str(),
                    if fields.is_empty() {
                        first.message.clone()
                    } else {
                        format!("would change {}", fields.join(", "))
                    },
                ))
            }
            _ => None,
        }
    }

    /// The action from what was (or would be) written, for an object that is not blocked.
    fn planned_action(&self) -> &'static str {
        let writes = || self.actions.iter().filter(|a| a.writes);
        let reasons = || writes().filter_map(|a| Reason::parse(&a.reason));
        if reasons().any(|reason| reason == Reason::Created) {
            "create"
        } else if reasons().any(|reason| matches!(reason, Reason::Deleted | Reason::TagsDeleted)) {
            "delete"
        } else if writes().next().is_some() {
            "update"
        } else {
            "no change"
        }
    }

    pub fn changes_anything(&self) -> bool {
        self.actions.iter().any(|a| a.writes)
    }
}

/// Everything a pass did.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub mode: String,
    pub gitlab_url: String,
    pub notes: Vec<String>,
    pub objects: Vec<ObjectReport>,
}

impl Report {
    pub fn changes_anything(&self) -> bool {
        self.objects.iter().any(ObjectReport::changes_anything)
    }

    pub fn all_ready(&self) -> bool {
        self.objects.iter().all(|o| o.ready == Some(true))
    }

    /// Some object needs a change to the manifests (or the environment) before `apply` can
    /// complete it: an invalid spec, a missing Secret, a placeholder password to be sent.
    pub fn needs_fixing(&self) -> bool {
        self.objects.iter().any(|o| {
            [Some(o.reason.as_str()), o.action.strip_prefix("blocked: ")]
                .into_iter()
                .flatten()
                .filter_map(Reason::parse)
                .any(needs_a_fix)
        })
    }
}

/// Whether an object refused for `reason` waits for a change to the manifests or the
/// environment (the exit code for "needs fixing"), not for GitLab.
fn needs_a_fix(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::PlaceholderPassword
            | Reason::InvalidSpec
            | Reason::SecretNotFound
            | Reason::NotPermitted
    )
}

/// The world of one standalone pass: the manifests, and the GitLab ids found so far.
struct PassWorld<'a> {
    manifests: &'a Manifests,
    registry_ids: &'a BTreeMap<(String, String), i64>,
    /// Registries the first pass failed on: not getting an id in this pass.
    registries_not_created: &'a BTreeSet<(String, String)>,
    upstream_ids: &'a BTreeMap<(String, String), i64>,
    plan: bool,
    /// Every Upstream has had its turn in this pass: one without an id now is not getting one.
    upstreams_had_their_turn: bool,
}

impl World for PassWorld<'_> {
    /// A registry without an id after the first pass gets one only from a plan (which
    /// creates it, unless the first pass failed on it); an apply would have created it.
    fn registries(&self) -> Vec<RegistryFacts> {
        self.manifests
            .registries
            .iter()
            .map(|registry| {
                let key = (namespace_of(&registry.object), registry.object.name_any());
                let mut facts = resolve::registry_facts(&registry.object);
                facts.id = match (self.registry_ids.get(&key), facts.id) {
                    (Some(id), _) => GitLabId::Held(*id),
                    (None, GitLabId::OnItsWay)
                        if self.plan && !self.registries_not_created.contains(&key) =>
                    {
                        GitLabId::OnItsWay
                    }
                    (None, _) => GitLabId::Blocked,
                };
                facts
            })
            .collect()
    }

    /// Upstreams have their ids once their turn in the pass came.
    fn upstreams(&self) -> Vec<UpstreamFacts> {
        self.manifests
            .upstreams
            .iter()
            .map(|upstream| {
                let key = (namespace_of(&upstream.object), upstream.object.name_any());
                let mut facts = resolve::upstream_facts(&upstream.object);
                facts.id = match self.upstream_ids.get(&key) {
                    Some(id) => GitLabId::Held(*id),
                    None if self.upstreams_had_their_turn => GitLabId::Blocked,
                    None => facts.id,
                };
                facts
            })
            .collect()
    }

    fn plans_creations(&self) -> bool {
        self.plan
    }
}

fn namespace_of<K: ResourceExt>(object: &K) -> String {
    object.namespace().unwrap_or_else(|| "default".into())
}

/// Reconciles (or plans) every manifest once.
pub async fn reconcile_all(
    client: &GitLabClient,
    manifests: &Manifests,
    mode: Mode,
    resend_credentials: bool,
    approved_deletions: &BTreeSet<String>,
) -> Report {
    let mut report = Report {
        mode: if mode.writes() {
            "apply".into()
        } else {
            "plan".into()
        },
        gitlab_url: client.base_url().to_string(),
        notes: Vec::new(),
        objects: Vec::new(),
    };

    // Registries first: an upstream can only be created through one.
    let mut registry_ids: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut registries_not_created: BTreeSet<(String, String)> = BTreeSet::new();
    let mut first_pass: BTreeMap<(String, String), RegistryOutcome> = BTreeMap::new();
    let no_ids = BTreeMap::new();
    let none_failed = BTreeSet::new();
    // Members all unresolved (no Upstream has had its turn): this pass creates the registry
    // but removes no association, since upstream ids are not known yet.
    let before_upstreams = PassWorld {
        manifests,
        registry_ids: &no_ids,
        registries_not_created: &none_failed,
        upstream_ids: &no_ids,
        plan: !mode.writes(),
        upstreams_had_their_turn: false,
    };
    for registry in &manifests.registries {
        let key = (namespace_of(&registry.object), registry.object.name_any());
        // In plan mode this read-only look is all; in apply mode the registry is created now
        // so upstreams can be created through it.
        let outcome = registry::reconcile(
            client,
            &registry_request(&registry.object, &before_upstreams, None, mode),
        )
        .await;
        if let Some(id) = outcome.registry_id {
            registry_ids.insert(key.clone(), id);
        } else if outcome.error.is_some() {
            registries_not_created.insert(key.clone());
        }
        first_pass.insert(key, outcome);
    }

    let mut upstream_ids: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut upstreams_created_by_plan: Vec<(String, String)> = Vec::new();
    for upstream in &manifests.upstreams {
        let namespace = namespace_of(&upstream.object);
        let name = upstream.object.name_any();
        let mut object_report = ObjectReport::new(
            "Upstream",
            namespace.clone(),
            name.clone(),
            &upstream.source,
        );
        let world = PassWorld {
            manifests,
            registry_ids: &registry_ids,
            registries_not_created: &registries_not_created,
            upstream_ids: &upstream_ids,
            plan: !mode.writes(),
            upstreams_had_their_turn: false,
        };
        let (request, placeholder) =
            match upstream_request(upstream, manifests, &world, mode, resend_credentials) {
                Ok(prepared) => prepared,
                Err(message) => {
                    object_report.not_synced(Reason::SecretNotFound.as_str(), message, mode, false);
                    report.objects.push(object_report);
                    continue;
                }
            };
        let mut request = request;
        let found_by_name = match find_by_unique_name(client, upstream, manifests).await {
            Ok(NameMatch::NotFound) => None,
            Ok(NameMatch::Unique(found)) => {
                request.known.upstream_id = Some(found.id);
                Some(found)
            }
            Ok(NameMatch::Ambiguous(message)) => {
                object_report.not_synced(AMBIGUOUS_UPSTREAM, message, mode, false);
                report.objects.push(object_report);
                continue;
            }
            Err(error) => {
                let message = format!(
                    "listing the upstreams of {}: {}",
                    upstream.object.spec.group,
                    error.message()
                );
                object_report.not_synced(error.reason(), message, mode, false);
                report.objects.push(object_report);
                continue;
            }
        };
        let desired_url = request.desired.url.clone();
        let mut outcome = match placeholder {
            None => upstream::reconcile(client, &request).await,
            Some(placeholder) => reconcile_keeping_placeholder(client, request, &placeholder).await,
        };
        if let Some(found) = found_by_name {
            outcome.actions.insert(
                0,
                Action::new(
                    Reason::Adopted.as_str(),
                    format!(
                        "upstream {} ({}) is the only one of that name in the group and no \
                         other manifest claims it: its url {} becomes {desired_url}",
                        found.id, found.name, found.url
                    ),
                )
                .read_only(),
            );
        }
        if let Some(id) = outcome.upstream_id {
            upstream_ids.insert((namespace.clone(), name.clone()), id);
        } else if !mode.writes()
            && outcome
                .actions
                .iter()
                .any(|a| a.reason == Reason::Created.as_str())
        {
            upstreams_created_by_plan.push((namespace.clone(), name.clone()));
        }
        fill_upstream_report(&mut object_report, &outcome, mode);
        report.objects.push(object_report);
    }

    for registry in &manifests.registries {
        let key = (namespace_of(&registry.object), registry.object.name_any());
        let mut object_report = ObjectReport::new(
            "VirtualRegistry",
            key.0.clone(),
            key.1.clone(),
            &registry.source,
        );
        // Every Upstream has had its turn: one without an id now is not getting one in this
        // pass, and the members after it are associated without waiting for it.
        let after_upstreams = PassWorld {
            manifests,
            registry_ids: &registry_ids,
            registries_not_created: &registries_not_created,
            upstream_ids: &upstream_ids,
            plan: !mode.writes(),
            upstreams_had_their_turn: true,
        };
        let known_id = registry_ids.get(&key).copied();
        let request = registry_request(&registry.object, &after_upstreams, known_id, mode);
        let members = request.desired.members.clone();
        let outcome = if mode.writes() || known_id.is_some() {
            registry::reconcile(client, &request).await
        } else {
            match first_pass.remove(&key) {
                Some(outcome) => outcome,
                None => registry::reconcile(client, &request).await,
            }
        };
        if mode.writes()
            && let Some(first) = first_pass.get(&key)
        {
            object_report
                .actions
                .extend(first.actions.iter().map(ActionView::from));
        }
        object_report
            .actions
            .extend(outcome.actions.iter().map(ActionView::from));
        for member in &members {
            let created_by_plan =
                upstreams_created_by_plan.contains(&(key.0.clone(), member.name.clone()));
            if created_by_plan {
                object_report.actions.push(ActionView::from(&Action::new(
                    Reason::Associated.as_str(),
                    format!(
                        "upstream {} is created through this registry by this plan",
                        member.name
                    ),
                )));
            }
        }
        object_report.gitlab_id = outcome.registry_id;
        if let Some(prefix) = &outcome.pull_prefix {
            object_report.details.push(format!("pull prefix: {prefix}"));
        }
        let mut resolved = outcome.upstreams_resolved.clone();
        if !mode.writes()
            && members.iter().all(|m| {
                matches!(m.resolution, Resolution::Resolved(_))
                    || upstreams_created_by_plan.contains(&(key.0.clone(), m.name.clone()))
            })
        {
            resolved = ConditionUpdate::new(
                conditions::UPSTREAMS_RESOLVED,
                true,
                Reason::Resolved.as_str(),
                "every upstream resolves (some by this plan)",
            );
        }
        object_report.conclude(
            vec![outcome.synced.clone(), resolved],
            &[SYNCED, conditions::UPSTREAMS_RESOLVED],
            mode,
            outcome.registry_id.is_some(),
        );
        report.objects.push(object_report);
    }

    for policy in &manifests.cleanup_policies {
        report.objects.push(
            cleanup_policy_report(
                client,
                policy,
                &PassWorld {
                    manifests,
                    registry_ids: &registry_ids,
                    registries_not_created: &registries_not_created,
                    upstream_ids: &upstream_ids,
                    plan: !mode.writes(),
                    upstreams_had_their_turn: true,
                },
                mode,
                approved_deletions,
            )
            .await,
        );
    }
    report
}

/// Runs a CleanupPolicy once (honouring `dryRun`), or syncs GitLab's own policy. Without a
/// cluster nothing says which images Pods run: with `keepInUse` the run deletes nothing.
/// `approved_deletions` (`--approve`) add to the fingerprints the manifest's
/// `gitlabregistry.io/approve-deletion` annotation approves.
async fn cleanup_policy_report(
    client: &GitLabClient,
    policy: &Manifest<CleanupPolicy>,
    world: &PassWorld<'_>,
    mode: Mode,
    approved_deletions: &BTreeSet<String>,
) -> ObjectReport {
    use crate::resolve::cleanup_policy::{
        gitlab_policy_project, request, run_condition, run_summary,
    };
    use crate::sync::cleanup::{DesiredGitLabPolicy, InUse, run_cleanup, sync_gitlab_policy};
    let namespace = namespace_of(&policy.object);
    let mut object_report = ObjectReport::new(
        "CleanupPolicy",
        namespace.clone(),
        policy.object.name_any(),
        &policy.source,
    );
    let fail = |report: &mut ObjectReport, reason: &str, message: String| {
        report.not_synced(reason, message, mode, true);
    };
    if policy.object.spec.strategy == CleanupStrategy::GitLabPolicy {
        let outcome = match (
            gitlab_policy_project(&policy.object),
            DesiredGitLabPolicy::from_spec(&policy.object.spec),
        ) {
            (Ok(project), Ok(desired)) => sync_gitlab_policy(client, &project, &desired, mode)
                .await
                .map_err(resolve::Error::from),
            (Err(error), _) => Err(error),
            (_, Err(error)) => Err(error.into()),
        };
        match outcome {
            Ok(outcome) => {
                object_report
                    .actions
                    .extend(outcome.action.iter().map(ActionView::from));
                if let Some(next) = outcome.next_run_at {
                    object_report
                        .details
                        .push(format!("GitLab runs it next at {next}"));
                }
                object_report.details.extend(outcome.notes);
                object_report.conclude(
                    vec![ConditionUpdate::new(
                        SYNCED,
                        true,
                        Reason::Synced.as_str(),
                        "GitLab's cleanup policy is in line",
                    )],
                    &[SYNCED],
                    mode,
                    true,
                );
            }
            Err(error) => fail(&mut object_report, error.reason(), error.message()),
        }
        return object_report;
    }
    let in_use = InUse::Unavailable(
        "standalone mode has no cluster to read the images Pods run from".into(),
    );
    let run = match request(&policy.object, world, in_use, jiff::Timestamp::now(), mode) {
        Ok(mut run) => {
            run.approved_deletions
                .extend(approved_deletions.iter().cloned());
            run
        }
        Err(error) => {
            fail(&mut object_report, error.reason(), error.message());
            return object_report;
        }
    };
    match run_cleanup(client, &run).await {
        Ok(report) => {
            let verb = if report.simulated() {
                "would delete"
            } else {
                "deleted"
            };
            object_report.details.push(format!(
                "run: {:?}{}: {} repositories, {} evaluated, {verb} {}, kept {} ({} protected), {} failures",
                report.outcome,
                if report.dry_run { " (dry run)" } else { "" },
                report.repositories,
                report.tags_evaluated,
                report.tags_deleted,
                report.tags_kept,
                report.tags_protected,
                report.failures
            ));
            if !report.message.is_empty() {
                object_report.details.push(report.message.clone());
            }
            let summary = run_summary(&report, jiff::Timestamp::now(), jiff::Timestamp::now());
            for pending in &summary.pending_approval {
                object_report.details.push(format!(
                    "needs approval: {} would lose {} of {} tags; approve with --approve {}",
                    pending.repository, pending.would_delete, pending.total, pending.fingerprint
                ));
            }
            object_report.pending_approval = summary.pending_approval;
            object_report
                .actions
                .extend(report.actions().iter().map(ActionView::from));
            object_report.conclude(vec![run_condition(&report)], &[SYNCED], mode, true);
        }
        Err(error) => fail(&mut object_report, error.reason(), error.message()),
    }
    object_report
}

/// The operator's request for `registry` (`resolve::registry::request`), with what standalone
/// knows instead of a status: the id found in this pass, and no record of handled one-shot
/// actions — so the purge-cache annotation is not acted on (it would purge at every apply).
fn registry_request(
    registry: &VirtualRegistry,
    world: &impl World,
    known_id: Option<i64>,
    mode: Mode,
) -> registry::RegistryRequest {
    let mut request = resolve::registry::request(registry, world);
    request.known.registry_id = known_id;
    request.known.last_handled_purge_cache = None;
    request.known.waiting_for_upstreams = false;
    request.purge_cache_request = None;
    request.mode = mode;
    request
}

fn upstream_request(
    upstream: &Manifest<Upstream>,
    manifests: &Manifests,
    world: &impl World,
    mode: Mode,
    resend_credentials: bool,
) -> Result<(upstream::UpstreamRequest, Option<Placeholder>), String> {
    let mut placeholder = None;
    let credentials = match &upstream.object.spec.credentials_secret_ref {
        None => None,
        Some(reference) => {
            let namespace = namespace_of(&upstream.object);
            let from_environment = |key: &str| {
                std::env::var(environment_variable(&reference.name, key))
                    .ok()
                    .map(SecretString::from)
            };
            let read = |key: &str| -> Result<SecretString, String> {
                if let Some(secret) = manifests.secrets.iter().find(|s| {
                    namespace_of(&s.object) == namespace && s.object.name_any() == reference.name
                }) {
                    return secret_key(&secret.object, &namespace, key)
                        .map(|v| v.value)
                        .map_err(|e| e.to_string());
                }
                from_environment(key).ok_or_else(|| {
                    format!(
                        "Secret {} not in the manifests and {} not set",
                        reference.name,
                        environment_variable(&reference.name, key)
                    )
                })
            };
            let username = read(&reference.username_key)?;
            let mut password = read(&reference.password_key)?;
            if password.expose_secret() == PLACEHOLDER_PASSWORD {
                // The environment can supply the real password of an exported Secret.
                match from_environment(&reference.password_key) {
                    Some(real) => password = real,
                    None => {
                        placeholder = Some(Placeholder {
                            secret: reference.name.clone(),
                            variable: environment_variable(
                                &reference.name,
                                &reference.password_key,
                            ),
                        })
                    }
                }
            }
            Some(ResolvedCredentials {
                credentials: UpstreamCredentials::new(username.expose_secret(), password),
                version: CredentialsVersion {
                    secret_name: reference.name.clone(),
                    resource_version: "manifest".into(),
                },
            })
        }
    };
    // A manifest carries no status: the request is built as the controller builds it for an
    // object it has not reconciled yet, with the ids found so far in the pass.
    let mut request =
        resolve::upstream::request(&upstream.object, credentials, world, jiff::Timestamp::now())
            .map_err(|error| error.to_string())?;
    request.mode = mode;
    // Standalone keeps no status: credentials GitLab holds for an existing upstream are taken
    // as current (their username is still compared) unless asked to send them again.
    if !resend_credentials {
        request.known.applied_credentials = request
            .desired
            .credentials
            .as_ref()
            .map(|c| c.version.clone());
    }
    Ok((request, placeholder))
}

/// Reason of an Upstream whose url changed while other upstreams share its name.
pub const AMBIGUOUS_UPSTREAM: &str = Reason::AmbiguousUpstream.as_str();

/// How a manifest's upstream is found by name alone, when adoption by name and url finds
/// nothing.
#[derive(Debug)]
enum NameMatch {
    /// Adoption by name and url applies, or nothing of that name is free: create.
    NotFound,
    /// The one upstream of that name in the group that no other manifest claims: the same
    /// upstream with a changed url.
    Unique(Box<crate::gitlab::Upstream>),
    /// Several could be it: a message naming the candidates.
    Ambiguous(String),
}

/// Standalone keeps no state, so an upstream whose url changed in its manifest is not found
/// by name and url. GitLab's upstream names are not unique, so a name alone identifies it
/// only when it is unique among the group's upstreams, no other manifest claims it (same
/// name and url), and no other manifest of the group declares that name. Otherwise, creating
/// would duplicate it (leaving the old one with its credentials): the candidates are named
/// instead.
async fn find_by_unique_name(
    client: &GitLabClient,
    upstream: &Manifest<Upstream>,
    manifests: &Manifests,
) -> Result<NameMatch, crate::gitlab::Error> {
    let spec = &upstream.object.spec;
    let name = upstream.object.gitlab_name();
    let listed = client
        .list_group_upstreams_all(&PathOrId::parse(&spec.group), Some(&name))
        .await?;
    let named: Vec<_> = listed.into_iter().filter(|u| u.name == name).collect();
    if named.is_empty() || named.iter().any(|u| u.url == spec.url) {
        return Ok(NameMatch::NotFound);
    }
    let namespace = namespace_of(&upstream.object);
    let others: Vec<&Upstream> = manifests
        .upstreams
        .iter()
        .map(|m| &m.object)
        .filter(|other| {
            !(namespace_of(*other) == namespace && other.name_any() == upstream.object.name_any())
        })
        .filter(|other| other.spec.group == spec.group && other.gitlab_name() == name)
        .collect();
    // Other manifests that found no upstream of their own would claim the same one.
    let competing: Vec<&Upstream> = others
        .iter()
        .copied()
        .filter(|other| {
            !named
                .iter()
                .any(|candidate| candidate.url == other.spec.url)
        })
        .collect();
    let unclaimed: Vec<_> = named
        .into_iter()
        .filter(|candidate| !others.iter().any(|other| other.spec.url == candidate.url))
        .collect();
    match unclaimed.as_slice() {
        [] => Ok(NameMatch::NotFound),
        [only] if competing.is_empty() => Ok(NameMatch::Unique(Box::new(only.clone()))),
        candidates => {
            let listed: Vec<String> = candidates
                .iter()
                .map(|c| format!("{} ({})", c.id, c.url))
                .collect();
            let manifests_too = if competing.is_empty() {
                String::new()
            } else {
                format!(
                    "; other manifests of this group also declare the name: {}",
                    competing
                        .iter()
                        .map(|o| format!("{}/{}", namespace_of(*o), o.name_any()))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            Ok(NameMatch::Ambiguous(format!(
                "more than one upstream named {name:?} in group {} could be this one, none with url \
                 {}: {}{manifests_too}; nothing created. Give the one that is not this upstream \
                 another name, or delete it",
                spec.group,
                spec.url,
                listed.join(", ")
            )))
        }
    }
}

fn fill_upstream_report(report: &mut ObjectReport, outcome: &UpstreamOutcome, mode: Mode) {
    report.gitlab_id = outcome.upstream_id;
    report
        .actions
        .extend(outcome.actions.iter().map(ActionView::from));
    if let Some(check) = &outcome.last_check {
        report.details.push(match (&check.success, &check.result) {
            (true, _) => "connection test: GitLab reached the upstream".to_string(),
            (false, Some(result)) => format!("connection test failed: {result}"),
            (false, None) => "connection test failed".to_string(),
        });
    }
    let mut updates = vec![outcome.synced.clone()];
    let mut components = vec![SYNCED];
    if let Some(reachable) = &outcome.reachable {
        updates.push(reachable.clone());
        components.push(conditions::REACHABLE);
    }
    report.conclude(updates, &components, mode, outcome.upstream_id.is_some());
}

/// Where a placeholder password came from, to tell the user where the real one goes.
#[derive(Debug, Clone)]
struct Placeholder {
    secret: String,
    variable: String,
}

/// Reconciles an upstream whose Secret holds `export`'s placeholder password: planned first,
/// and applied only when that plan sends no credentials (GitLab keeps the password it holds);
/// otherwise blocked, with what the plan found (its id, so registries still resolve it).
async fn reconcile_keeping_placeholder(
    client: &GitLabClient,
    request: upstream::UpstreamRequest,
    placeholder: &Placeholder,
) -> UpstreamOutcome {
    let mut planned_request = request.clone();
    planned_request.mode = Mode::Plan;
    let mut planned = upstream::reconcile(client, &planned_request).await;
    let sends_credentials = planned.actions.iter().any(|action| {
        action.writes
            && (action.reason == Reason::Created.as_str()
                || action.changes.iter().any(|c| c.field == "credentials"))
    });
    if !sends_credentials {
        return if request.mode.writes() {
            upstream::reconcile(client, &request).await
        } else {
            planned
        };
    }
    let message = format!(
        "the password in Secret {} is the placeholder `export` wrote (GitLab never returns passwords) \
         and this change would send it to GitLab: put the real password in the Secret, or set {}",
        placeholder.secret, placeholder.variable
    );
    planned.actions.retain(|action| !action.writes);
    planned.actions.push(
        Action::new(
            REASON_PLACEHOLDER_PASSWORD,
            format!("credentials not sent: {message}"),
        )
        .read_only(),
    );
    planned.synced = ConditionUpdate::new(SYNCED, false, REASON_PLACEHOLDER_PASSWORD, message);
    planned
}

/// The human table: one line per object, then what was (or would be) done.
pub fn render_table(report: &Report) -> String {
    let mut out = String::new();
    let width = report
        .objects
        .iter()
        .map(|o| o.kind.len() + o.name.len() + o.namespace.len() + 2)
        .max()
        .unwrap_or(10)
        .max(12);
    let action_width = report
        .objects
        .iter()
        .map(|o| o.action.len())
        .max()
        .unwrap_or(0)
        .max("no change".len());
    out.push_str(&format!(
        "{:<width$}  {:<action_width$}  {:<5}  {:<24}  {}\n",
        "OBJECT", "ACTION", "READY", "REASON", "MESSAGE"
    ));
    for object in &report.objects {
        let name = format!("{}/{}/{}", object.kind, object.namespace, object.name);
        // Readiness only of what exists in GitLab.
        let ready = match object.ready {
            Some(true) => "True",
            Some(false) => "False",
            None => "-",
        };
        out.push_str(&format!(
            "{name:<width$}  {:<action_width$}  {ready:<5}  {:<24}  {}\n",
            object.action, object.reason, object.message
        ));
    }
    for object in &report.objects {
        if object.actions.is_empty() && object.details.is_empty() {
            continue;
        }
        out.push_str(&format!(
            "\n{} {}/{} ({})\n",
            object.kind, object.namespace, object.name, object.source
        ));
        for action in &object.actions {
            let marker = match (action.writes, Reason::parse(&action.reason)) {
                (false, _) => "  ",
                (true, Some(Reason::Created | Reason::Associated)) => "+ ",
                (true, Some(Reason::Deleted | Reason::Disassociated)) => "- ",
                (true, _) => "~ ",
            };
            out.push_str(&format!(
                "  {marker}{}: {}\n",
                action.reason, action.message
            ));
            for change in &action.changes {
                out.push_str(&format!(
                    "        {}: {} -> {}\n",
                    change.field,
                    change.from.as_deref().unwrap_or("(unset)"),
                    change.to.as_deref().unwrap_or("(unset)")
                ));
            }
        }
        for detail in &object.details {
            out.push_str(&format!("    {detail}\n"));
        }
    }
    let blocked = report
        .objects
        .iter()
        .filter(|o| o.action.starts_with("blocked"))
        .count();
    if blocked > 0 {
        out.push_str(&format!(
            "\n{blocked} object(s) blocked: {} cannot complete them as they are (see ACTION and MESSAGE).\n",
            if report.mode == "plan" { "apply" } else { "this apply" }
        ));
    } else if report.mode == "plan" && !report.changes_anything() {
        out.push_str("\nNo changes: GitLab is in line with the manifests.\n");
    }
    out
}
