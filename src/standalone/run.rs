//! One standalone pass over the manifests: registries first (upstreams are created through
//! them), then upstreams, then registries again (their upstreams now have ids), then cleanup
//! policies. `plan` sends only GET requests and reports what `apply` would change.

use std::collections::BTreeMap;

use kube::ResourceExt;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use super::manifests::{Manifest, Manifests, environment_variable};
use crate::controller::connection::secret_key;
use crate::crd::conditions::{self, SYNCED, Status};
use crate::crd::{
    CleanupPolicy, CleanupStrategy, Upstream, VirtualRegistry, conditions::ConditionUpdate,
};
use crate::gitlab::{GitLabClient, PathOrId, UpstreamCredentials};
use crate::sync::registry::{self, DesiredMember, RegistryOutcome, Resolution};
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
    pub ready: bool,
    pub reason: String,
    pub message: String,
    pub conditions: Vec<ConditionView>,
    pub actions: Vec<ActionView>,
    /// Extra lines (pull prefix, cleanup counts, …).
    pub details: Vec<String>,
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
            ready: false,
            reason: String::new(),
            message: String::new(),
            conditions: Vec::new(),
            actions: Vec::new(),
            details: Vec::new(),
        }
    }

    /// Sets the conditions and derives Ready from `components`.
    pub(super) fn conclude(&mut self, updates: Vec<ConditionUpdate>, components: &[&'static str]) {
        let now = crate::controller::status::now();
        let mut all = Vec::new();
        for update in updates {
            conditions::set_condition(&mut all, update, None, &now);
        }
        let ready = conditions::ready_summary(&all, components);
        self.ready = ready.status == Status::True;
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
        self.objects.iter().all(|o| o.ready)
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
    let mut first_pass: BTreeMap<(String, String), RegistryOutcome> = BTreeMap::new();
    for registry in &manifests.registries {
        let key = (namespace_of(&registry.object), registry.object.name_any());
        // Members all unresolved (Pending): this pass creates the registry but removes no
        // association, since upstream ids are not known yet.
        let members = resolve_members(&registry.object, &BTreeMap::new(), Resolution::Pending);
        let request = registry_request(&registry.object, members.clone(), None, Mode::Plan);
        // A read-only look first: in plan mode this is all; in apply mode the registry is
        // created now so upstreams can be created through it.
        let outcome = if mode.writes() {
            registry::reconcile(
                client,
                &registry_request(&registry.object, members.clone(), None, Mode::Apply),
            )
            .await
        } else {
            registry::reconcile(client, &request).await
        };
        if let Some(id) = outcome.registry_id {
            registry_ids.insert(key.clone(), id);
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
        let registry_for_create = manifests
            .registries
            .iter()
            .filter(|r| {
                namespace_of(&r.object) == namespace
                    && r.object.spec.group == upstream.object.spec.group
            })
            .filter(|r| r.object.spec.upstreams.iter().any(|u| u.name == name))
            .map(|r| {
                registry_ids
                    .get(&(namespace.clone(), r.object.name_any()))
                    .copied()
                    .unwrap_or(0)
            })
            .max();
        let outcome = match upstream_request(
            upstream,
            manifests,
            registry_for_create,
            mode,
            resend_credentials,
        ) {
            Ok(request) => upstream::reconcile(client, &request).await,
            Err(message) => {
                object_report.conclude(
                    vec![ConditionUpdate::new(
                        SYNCED,
                        false,
                        "SecretNotFound",
                        message,
                    )],
                    &[SYNCED],
                );
                report.objects.push(object_report);
                continue;
            }
        };
        if let Some(id) = outcome.upstream_id {
            upstream_ids.insert((namespace.clone(), name.clone()), id);
        } else if !mode.writes() && outcome.actions.iter().any(|a| a.reason == "Created") {
            upstreams_created_by_plan.push((namespace.clone(), name.clone()));
        }
        fill_upstream_report(&mut object_report, &outcome);
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
        let members = resolve_members(&registry.object, &upstream_ids, Resolution::Blocked);
        let known_id = registry_ids.get(&key).copied();
        let outcome = if mode.writes() || known_id.is_some() {
            registry::reconcile(
                client,
                &registry_request(&registry.object, members.clone(), known_id, mode),
            )
            .await
        } else {
            match first_pass.remove(&key) {
                Some(outcome) => outcome,
                None => {
                    registry::reconcile(
                        client,
                        &registry_request(&registry.object, members.clone(), None, mode),
                    )
                    .await
                }
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
                    "Associated",
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
                "Resolved",
                "every upstream resolves (some by this plan)",
            );
        }
        object_report.conclude(
            vec![outcome.synced.clone(), resolved],
            &[SYNCED, conditions::UPSTREAMS_RESOLVED],
        );
        report.objects.push(object_report);
    }

    for policy in &manifests.cleanup_policies {
        report
            .objects
            .push(cleanup_policy_report(client, policy, manifests, &upstream_ids, mode).await);
    }
    report
}

/// Runs a CleanupPolicy once (honouring `dryRun`), or syncs GitLab's own policy. Without a
/// cluster nothing says which images Pods run: with `keepInUse` the run deletes nothing.
async fn cleanup_policy_report(
    client: &GitLabClient,
    policy: &Manifest<CleanupPolicy>,
    manifests: &Manifests,
    upstream_ids: &BTreeMap<(String, String), i64>,
    mode: Mode,
) -> ObjectReport {
    use crate::controller::cleanup_policy::{build_run, run_condition};
    use crate::sync::cleanup::{DesiredGitLabPolicy, InUse, run_cleanup, sync_gitlab_policy};
    let namespace = namespace_of(&policy.object);
    let mut object_report = ObjectReport::new(
        "CleanupPolicy",
        namespace.clone(),
        policy.object.name_any(),
        &policy.source,
    );
    let fail = |report: &mut ObjectReport, reason: &str, message: String| {
        report.conclude(
            vec![ConditionUpdate::new(
                SYNCED,
                false,
                reason.to_string(),
                message,
            )],
            &[SYNCED],
        );
    };
    if policy.object.spec.strategy == CleanupStrategy::GitLabPolicy {
        let project = policy
            .object
            .spec
            .target
            .container_repositories
            .as_ref()
            .and_then(|t| t.project.as_deref());
        let outcome = match (project, DesiredGitLabPolicy::from_spec(&policy.object.spec)) {
            (Some(project), Ok(desired)) => {
                sync_gitlab_policy(client, &PathOrId::parse(project), &desired, mode).await
            }
            (None, _) => Err(crate::sync::Error::InvalidSpec(
                "strategy GitLabPolicy needs a project target".into(),
            )),
            (_, Err(error)) => Err(error),
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
                        "Synced",
                        "GitLab's cleanup policy is in line",
                    )],
                    &[SYNCED],
                );
            }
            Err(error) => fail(&mut object_report, error.reason(), error.message()),
        }
        return object_report;
    }
    // The Upstream objects as the controller would see them: with the ids this pass found.
    let upstreams: Vec<Upstream> = manifests
        .upstreams
        .iter()
        .map(|u| {
            let mut upstream = u.object.clone();
            let id = upstream_ids
                .get(&(namespace_of(&upstream), upstream.name_any()))
                .copied();
            upstream.status = Some(crate::crd::UpstreamStatus {
                upstream_id: id,
                ..Default::default()
            });
            upstream
        })
        .collect();
    let in_use = InUse::Unavailable(
        "standalone mode has no cluster to read the images Pods run from".into(),
    );
    let run = match build_run(
        &policy.object,
        upstreams.iter(),
        in_use,
        jiff::Timestamp::now(),
        mode,
    ) {
        Ok(run) => run,
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
            object_report
                .actions
                .extend(report.actions().iter().map(ActionView::from));
            object_report.conclude(vec![run_condition(&report)], &[SYNCED]);
        }
        Err(error) => fail(&mut object_report, error.reason(), error.message()),
    }
    object_report
}

fn resolve_members(
    registry: &VirtualRegistry,
    upstream_ids: &BTreeMap<(String, String), i64>,
    unresolved: Resolution,
) -> Vec<DesiredMember> {
    let namespace = namespace_of(registry);
    registry
        .spec
        .upstreams
        .iter()
        .map(|u| DesiredMember {
            name: u.name.clone(),
            resolution: match upstream_ids.get(&(namespace.clone(), u.name.clone())) {
                Some(id) => Resolution::Resolved(*id),
                None => unresolved.clone(),
            },
        })
        .collect()
}

fn registry_request(
    registry: &VirtualRegistry,
    members: Vec<DesiredMember>,
    known_id: Option<i64>,
    mode: Mode,
) -> registry::RegistryRequest {
    registry::RegistryRequest {
        desired: registry::DesiredRegistry {
            group: PathOrId::parse(&registry.spec.group),
            name: registry.gitlab_name(),
            description: registry.spec.description.clone(),
            members,
        },
        known: registry::KnownRegistry {
            registry_id: known_id,
            last_handled_purge_cache: None,
            waiting_for_upstreams: false,
        },
        purge_cache_request: None,
        mode,
    }
}

fn upstream_request(
    upstream: &Manifest<Upstream>,
    manifests: &Manifests,
    registry_for_create: Option<i64>,
    mode: Mode,
    resend_credentials: bool,
) -> Result<upstream::UpstreamRequest, String> {
    let credentials = match &upstream.object.spec.credentials_secret_ref {
        None => None,
        Some(reference) => {
            let namespace = namespace_of(&upstream.object);
            let read = |key: &str| -> Result<SecretString, String> {
                if let Some(secret) = manifests.secrets.iter().find(|s| {
                    namespace_of(&s.object) == namespace && s.object.name_any() == reference.name
                }) {
                    return secret_key(&secret.object, &namespace, key)
                        .map(|v| v.value)
                        .map_err(|e| e.to_string());
                }
                let variable = environment_variable(&reference.name, key);
                std::env::var(&variable)
                    .map(SecretString::from)
                    .map_err(|_| {
                        format!(
                            "Secret {} not in the manifests and {variable} not set",
                            reference.name
                        )
                    })
            };
            let username = read(&reference.username_key)?;
            let password = read(&reference.password_key)?;
            Some(ResolvedCredentials {
                credentials: UpstreamCredentials::new(username.expose_secret(), password),
                version: CredentialsVersion {
                    secret_name: reference.name.clone(),
                    resource_version: "manifest".into(),
                },
            })
        }
    };
    // A dummy object carries no status: the request is built as the controller builds it.
    let mut request = crate::controller::upstream::build_request(
        &upstream.object,
        credentials,
        std::iter::empty(),
        jiff::Timestamp::now(),
    )
    .map_err(|error| error.to_string())?;
    request.registry_for_create = registry_for_create;
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
    Ok(request)
}

fn fill_upstream_report(report: &mut ObjectReport, outcome: &UpstreamOutcome) {
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
    report.conclude(updates, &components);
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
    out.push_str(&format!(
        "{:<width$}  {:<5}  {:<24}  {}\n",
        "OBJECT", "READY", "REASON", "MESSAGE"
    ));
    for object in &report.objects {
        let name = format!("{}/{}/{}", object.kind, object.namespace, object.name);
        let ready = if object.ready { "True" } else { "False" };
        out.push_str(&format!(
            "{name:<width$}  {ready:<5}  {:<24}  {}\n",
            object.reason, object.message
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
            let marker = match (report.mode.as_str(), action.reason.as_str(), action.writes) {
                (_, _, false) => "  ",
                (_, "Created", _) | (_, "Associated", _) => "+ ",
                (_, "Deleted", _) | (_, "Disassociated", _) => "- ",
                _ => "~ ",
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
    if report.mode == "plan" && !report.changes_anything() {
        out.push_str("\nNo changes: GitLab is in line with the manifests.\n");
    }
    out
}
