//! The VirtualRegistry controller: dereference (connection, the listed Upstreams' GitLab ids)
//! → the `sync::registry` engine → status and Events. On deletion with policy `Delete`,
//! upstreams whose objects still exist are disassociated first so GitLab keeps them.

use crate::crd::reasons::Reason;
use std::collections::HashSet;
use std::sync::Arc;

use kube::runtime::controller::Action as Requeue;
use kube::{Api, ResourceExt};

use super::connection::{Connection, gitlab_connection};
use super::status::{
    apply_status, mark_failed, mark_suspended, nothing_requested_since, now, publish_actions,
    publish_outcome,
};
use super::{Context, Error, Result, reconciler, tenancy};
use crate::crd::conditions::{self, SYNCED, UPSTREAMS_RESOLVED};
use crate::crd::virtual_registry::RegistryUpstreamStatus;
use crate::crd::{
    DeletionPolicy, PURGE_CACHE_REQUESTED_AT, RECONCILE_REQUESTED_AT, Upstream, VirtualRegistry,
    VirtualRegistryStatus,
};
use crate::gitlab::PathOrId;
use crate::resolve::{self, GitLabId, UpstreamFacts};
use crate::sync::registry::{
    DesiredMember, DesiredRegistry, KnownRegistry, RegistryOutcome, RegistryRequest, Resolution,
    SharedViews,
};
use crate::sync::{self, Mode};

pub async fn reconcile(registry: Arc<VirtualRegistry>, ctx: Arc<Context>) -> Result<Requeue> {
    reconciler::reconcile(
        registry,
        ctx,
        |registry, ctx, api| async move { apply(&registry, &ctx, &api).await },
        |registry, ctx| async move { cleanup(&registry, &ctx).await },
    )
    .await
}

pub fn error_policy(registry: Arc<VirtualRegistry>, error: &Error, ctx: Arc<Context>) -> Requeue {
    reconciler::error_policy(registry, error, ctx)
}

async fn apply(
    registry: &VirtualRegistry,
    ctx: &Context,
    api: &Api<VirtualRegistry>,
) -> Result<Requeue> {
    let current = registry.status.clone().unwrap_or_default();
    let generation = registry.metadata.generation;
    if registry.spec.suspend {
        let mut status = current.clone();
        status.observed_generation = generation;
        mark_suspended(
            &mut status.conditions,
            generation,
            "spec.suspend is true: nothing is sent to GitLab",
        );
        apply_status(api, registry, registry.status.as_ref(), &status).await?;
        return Ok(Requeue::await_change());
    }
    let namespace = registry.namespace().unwrap_or_default();
    let synced = async {
        tenancy::check_registry(ctx, registry)?;
        let Connection { client, key } =
            gitlab_connection(ctx, &namespace, registry.spec.gitlab.as_ref()).await?;
        let upstreams = ctx.upstreams.state();
        let request = build_request(registry, upstreams.iter().map(|u| u.as_ref()));
        let views = SharedViews {
            views: &ctx.registry_views,
            connection: &key,
            now: jiff::Timestamp::now(),
        };
        Ok::<_, Error>(sync::registry::reconcile_with_views(&client, &request, Some(views)).await)
    }
    .await;
    match synced {
        Ok(outcome) => {
            let status = status_from_outcome(registry, &current, &outcome);
            apply_status(api, registry, registry.status.as_ref(), &status).await?;
            publish_outcome(ctx, registry, &outcome.actions, outcome.error.as_ref()).await;
            if let Some(error) = outcome.error {
                return Err(Error::Sync(error));
            }
            Ok(Requeue::requeue(ctx.config.resync))
        }
        Err(error) => {
            let mut status = current.clone();
            status.observed_generation = generation;
            mark_failed(&mut status.conditions, &error, generation);
            apply_status(api, registry, registry.status.as_ref(), &status).await?;
            Err(error)
        }
    }
}

/// Whether the last reconcile left the registry waiting for Upstreams to get their GitLab
/// ids, and nothing else asked for a reconcile since (a new spec, a reconcile request): the
/// only case where the engine may plan on its recent view instead of reading the registry.
fn waiting_for_upstreams(registry: &VirtualRegistry, status: &VirtualRegistryStatus) -> bool {
    let waiting =
        conditions::find(&status.conditions, UPSTREAMS_RESOLVED).is_some_and(|resolved| {
            Reason::parse(&resolved.reason) == Some(Reason::WaitingForUpstream)
        });
    waiting
        && nothing_requested_since(
            registry,
            status.observed_generation,
            status.last_handled_reconcile_at.as_ref(),
        )
}

/// The engine's input from the object and the Upstream objects in the cluster. Pure.
pub fn build_request<'a>(
    registry: &VirtualRegistry,
    upstreams: impl Iterator<Item = &'a Upstream>,
) -> RegistryRequest {
    let namespace = registry.namespace();
    let in_namespace: Vec<UpstreamFacts> = upstreams
        .map(resolve::upstream_facts)
        .filter(|u| u.namespace == namespace)
        .collect();
    let members = registry
        .spec
        .upstreams
        .iter()
        .map(|reference| {
            let resolution = match in_namespace.iter().find(|u| u.name == reference.name) {
                None => Resolution::Missing,
                Some(upstream) => match upstream.id {
                    GitLabId::Held(id) => Resolution::Resolved(id),
                    GitLabId::Blocked => Resolution::Blocked,
                    GitLabId::OnItsWay => Resolution::Pending,
                },
            };
            DesiredMember {
                name: reference.name.clone(),
                resolution,
            }
        })
        .collect();
    let status = registry.status.clone().unwrap_or_default();
    RegistryRequest {
        desired: DesiredRegistry {
            group: PathOrId::parse(&registry.spec.group),
            name: registry.gitlab_name(),
            description: registry.spec.description.clone(),
            members,
        },
        known: KnownRegistry {
            registry_id: status.registry_id,
            last_handled_purge_cache: status.last_handled_purge_cache_at.clone(),
            waiting_for_upstreams: waiting_for_upstreams(registry, &status),
        },
        purge_cache_request: registry
            .annotations()
            .get(PURGE_CACHE_REQUESTED_AT)
            .cloned(),
        mode: Mode::Apply,
    }
}

/// The status to write after an engine run. Pure.
pub fn status_from_outcome(
    registry: &VirtualRegistry,
    current: &VirtualRegistryStatus,
    outcome: &RegistryOutcome,
) -> VirtualRegistryStatus {
    let generation = registry.metadata.generation;
    let now = now();
    let mut status = current.clone();
    status.observed_generation = generation;
    status.registry_id = outcome.registry_id;
    if outcome.group_id.is_some() {
        status.group_id = outcome.group_id;
    }
    status.pull_prefix = outcome.pull_prefix.clone();
    if outcome.error.is_none() {
        status.upstreams = outcome
            .members
            .iter()
            .filter_map(|member| {
                Some(RegistryUpstreamStatus {
                    name: member.name.clone(),
                    upstream_id: member.upstream_id,
                    association_id: member.association_id?,
                    position: i32::try_from(member.position).ok()?,
                })
            })
            .collect();
    }
    status.last_handled_purge_cache_at = outcome.last_handled_purge_cache.clone();
    status.last_handled_reconcile_at = registry.annotations().get(RECONCILE_REQUESTED_AT).cloned();
    conditions::set_condition(
        &mut status.conditions,
        outcome.synced.clone(),
        generation,
        &now,
    );
    conditions::set_condition(
        &mut status.conditions,
        outcome.upstreams_resolved.clone(),
        generation,
        &now,
    );
    let ready = conditions::ready_summary(&status.conditions, &[SYNCED, UPSTREAMS_RESOLVED]);
    conditions::set_condition(&mut status.conditions, ready, generation, &now);
    status
}

/// GitLab ids of the Upstream objects that stay (exist and are not being deleted) in the
/// registry's namespace: their upstreams must survive the registry's deletion.
pub fn upstream_ids_to_keep<'a>(
    registry: &VirtualRegistry,
    upstreams: impl Iterator<Item = &'a Upstream>,
) -> HashSet<i64> {
    let namespace = registry.namespace();
    upstreams
        .map(resolve::upstream_facts)
        .filter(|u| u.namespace == namespace && !u.leaving)
        .filter_map(|u| u.id.held())
        .collect()
}

async fn cleanup(registry: &VirtualRegistry, ctx: &Context) -> Result<Requeue> {
    let registry_id = registry.status.as_ref().and_then(|s| s.registry_id);
    let Some(registry_id) =
        registry_id.filter(|_| registry.spec.deletion_policy == DeletionPolicy::Delete)
    else {
        return Ok(Requeue::await_change());
    };
    let checked = tenancy::check_registry(ctx, registry);
    if !tenancy::may_clean_up_in_gitlab(checked, "VirtualRegistry", &registry.name_any()) {
        return Ok(Requeue::await_change());
    }
    let namespace = registry.namespace().unwrap_or_default();
    let Connection { client, key } =
        gitlab_connection(ctx, &namespace, registry.spec.gitlab.as_ref()).await?;
    let keep = upstream_ids_to_keep(registry, ctx.upstreams.state().iter().map(|u| u.as_ref()));
    let deleted = sync::registry::delete(&client, registry_id, &keep, Mode::Apply).await;
    ctx.registry_views.record_write(
        &key,
        &PathOrId::parse(&registry.spec.group),
        Some(registry_id),
    );
    ctx.registry_views.forget(&key, registry_id);
    let actions = deleted?;
    publish_actions(ctx, registry, &actions).await;
    Ok(Requeue::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::upstream::UpstreamStatus;

    fn upstream(name: &str, namespace: &str, id: Option<i64>) -> Upstream {
        let mut upstream: Upstream = serde_saphyr::from_str(&format!(
            "apiVersion: gitlabregistry.io/v1alpha1\nkind: Upstream\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {{group: my-org, url: 'https://quay.io'}}\n"
        ))
        .expect("valid");
        upstream.status = Some(UpstreamStatus {
            upstream_id: id,
            ..Default::default()
        });
        upstream
    }

    fn registry() -> VirtualRegistry {
        serde_saphyr::from_str(
            "apiVersion: gitlabregistry.io/v1alpha1\nkind: VirtualRegistry\nmetadata: {name: cache, namespace: team}\nspec: {group: my-org, upstreams: [{name: dockerhub}, {name: quay}, {name: ghcr}]}\n",
        )
        .expect("valid")
    }

    #[test]
    fn members_resolve_only_within_the_namespace() {
        let upstreams = [
            upstream("dockerhub", "team", Some(3)),
            upstream("quay", "team", None),
            upstream("ghcr", "other", Some(8)),
        ];
        let resolutions = resolutions(&build_request(&registry(), upstreams.iter()));
        assert_eq!(
            resolutions,
            vec![
                Resolution::Resolved(3),
                Resolution::Pending,
                Resolution::Missing
            ]
        );
        assert_eq!(
            build_request(&registry(), upstreams.iter()).desired.name,
            "cache"
        );
    }

    fn resolutions(request: &RegistryRequest) -> Vec<Resolution> {
        request
            .desired
            .members
            .iter()
            .map(|m| m.resolution.clone())
            .collect()
    }

    fn not_synced(mut upstream: Upstream, reason: &str) -> Upstream {
        let mut status = upstream.status.clone().unwrap_or_default();
        conditions::set_condition(
            &mut status.conditions,
            conditions::ConditionUpdate::new(SYNCED, false, reason, reason),
            None,
            &crate::controller::status::now(),
        );
        upstream.status = Some(status);
        upstream
    }

    #[test]
    fn an_upstream_that_failed_or_is_suspended_is_blocked_not_pending() {
        let failed = not_synced(
            upstream("dockerhub", "team", None),
            "ConnectivityTestFailed",
        );
        let waiting = not_synced(upstream("quay", "team", None), "WaitingForRegistry");
        let mut suspended = upstream("ghcr", "team", None);
        suspended.spec.suspend = true;
        let upstreams = [failed, waiting, suspended];
        let resolutions = resolutions(&build_request(&registry(), upstreams.iter()));
        assert_eq!(
            resolutions,
            vec![
                Resolution::Blocked,
                Resolution::Pending,
                Resolution::Blocked
            ]
        );
    }

    #[test]
    fn only_a_registry_left_waiting_for_upstreams_with_nothing_else_changed_may_plan_on_its_view() {
        let mut waiting = registry();
        waiting.metadata.generation = Some(3);
        let mut status = VirtualRegistryStatus {
            registry_id: Some(9),
            observed_generation: Some(3),
            ..Default::default()
        };
        conditions::set_condition(
            &mut status.conditions,
            conditions::ConditionUpdate::new(UPSTREAMS_RESOLVED, false, "WaitingForUpstream", "u"),
            Some(3),
            &crate::controller::status::now(),
        );
        waiting.status = Some(status.clone());
        assert!(
            build_request(&waiting, std::iter::empty())
                .known
                .waiting_for_upstreams
        );

        let mut edited = waiting.clone();
        edited.metadata.generation = Some(4);
        assert!(
            !build_request(&edited, std::iter::empty())
                .known
                .waiting_for_upstreams
        );

        let mut requested = waiting.clone();
        requested
            .annotations_mut()
            .insert(RECONCILE_REQUESTED_AT.into(), "now".into());
        assert!(
            !build_request(&requested, std::iter::empty())
                .known
                .waiting_for_upstreams
        );

        let mut resolved = waiting.clone();
        conditions::set_condition(
            &mut status.conditions,
            conditions::ConditionUpdate::new(UPSTREAMS_RESOLVED, true, "Resolved", "3"),
            Some(3),
            &crate::controller::status::now(),
        );
        resolved.status = Some(status);
        assert!(
            !build_request(&resolved, std::iter::empty())
                .known
                .waiting_for_upstreams
        );
    }

    #[test]
    fn upstreams_being_deleted_are_not_kept() {
        let mut leaving = upstream("quay", "team", Some(4));
        leaving.metadata.deletion_timestamp = Some(now());
        let upstreams = [
            upstream("dockerhub", "team", Some(3)),
            leaving,
            upstream("ghcr", "other", Some(8)),
        ];
        let keep = upstream_ids_to_keep(&registry(), upstreams.iter());
        assert_eq!(keep, HashSet::from([3]));
    }
}
