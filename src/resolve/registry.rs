//! The rules of a VirtualRegistry: its engine request from the object and the Upstreams
//! ([`World`]), and its status from the engine's outcome.

use std::collections::HashSet;

use kube::ResourceExt;

use super::facts::{GitLabId, UpstreamFacts};
use super::stamp::{nothing_requested_since, now};
use super::world::World;
use crate::crd::conditions::{self, SYNCED, UPSTREAMS_RESOLVED};
use crate::crd::reasons::Reason;
use crate::crd::virtual_registry::RegistryUpstreamStatus;
use crate::crd::{
    PURGE_CACHE_REQUESTED_AT, RECONCILE_REQUESTED_AT, VirtualRegistry, VirtualRegistryStatus,
};
use crate::gitlab::PathOrId;
use crate::sync::Mode;
use crate::sync::registry::{
    DesiredMember, DesiredRegistry, KnownRegistry, RegistryOutcome, RegistryRequest, Resolution,
};

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
pub fn request(registry: &VirtualRegistry, world: &impl World) -> RegistryRequest {
    let namespace = registry.namespace();
    let in_namespace: Vec<UpstreamFacts> = world
        .upstreams()
        .into_iter()
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
pub fn status(
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
pub fn upstream_ids_to_keep(registry: &VirtualRegistry, world: &impl World) -> HashSet<i64> {
    let namespace = registry.namespace();
    world
        .upstreams()
        .into_iter()
        .filter(|u| u.namespace == namespace && !u.leaving)
        .filter_map(|u| u.id.held())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Upstream;
    use crate::resolve::Objects;

    /// The request with `upstreams` as the cluster's Upstreams.
    fn build_request<'a>(
        registry: &VirtualRegistry,
        upstreams: impl Iterator<Item = &'a Upstream>,
    ) -> RegistryRequest {
        request(
            registry,
            &Objects {
                upstreams: upstreams.collect(),
                ..Default::default()
            },
        )
    }
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
            &now(),
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
            &now(),
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
            &now(),
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
        let world = Objects {
            upstreams: upstreams.iter().collect(),
            ..Default::default()
        };
        let keep = upstream_ids_to_keep(&registry(), &world);
        assert_eq!(keep, HashSet::from([3]));
    }
}
