//! The rules of an Upstream: its engine request from the object, its credentials and the
//! registries listing it ([`World`]), and its status from the engine's outcome.

use std::time::Duration;

use kube::ResourceExt;

use super::facts::GitLabId;
use super::stamp::now;
use super::world::World;
use super::{Error, Result};
use crate::cleanup::parse_duration;
use crate::crd::conditions::{self, SYNCED};
use crate::crd::upstream::{AppliedCredentials, ConnectivityCheckResult};
use crate::crd::{PURGE_CACHE_REQUESTED_AT, RECONCILE_REQUESTED_AT, Upstream, UpstreamStatus};
use crate::gitlab::PathOrId;
use crate::sync::Mode;
use crate::sync::upstream::{
    ConnectivityCheck, CreateThrough, CredentialsVersion, DesiredUpstream, KnownUpstream,
    ResolvedCredentials, TestedConfiguration, UpstreamOutcome, UpstreamRequest,
};

/// A registry that lists the Upstream and has a GitLab id, or is on its way to one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ListingRegistry {
    name: String,
    /// The Upstream's position in the registry's list.
    position: usize,
    id: Option<i64>,
}

/// The registry an Upstream is created through, chosen among the registries of its
/// namespace and group that list it and are not leaving, including those still on their way
/// to an id (so the choice does not depend on which registry got its id first): one that
/// lists it first, since the create puts it at position 1 where it belongs; else the
/// Upstreams are spread over the registries by their position in the first registry by name,
/// so creates go to different registries and run at once (GitLab takes one insert at a time
/// per registry), each registry moving at most its one created member into place afterwards.
/// `None` while the chosen registry has no id yet and no plan creates it: the Upstream waits
/// for it (its id triggers the next reconcile). The same for every reconcile while the
/// registries do not change, and the same for the operator and standalone.
pub fn create_through(upstream: &Upstream, world: &impl World) -> Option<CreateThrough> {
    let namespace = upstream.namespace();
    let name = upstream.name_any();
    let mut listing: Vec<ListingRegistry> = world
        .registries()
        .into_iter()
        .filter(|registry| {
            registry.namespace == namespace
                && !registry.leaving
                && registry.group == upstream.spec.group
        })
        .filter_map(|registry| {
            let id = match registry.id {
                GitLabId::Held(id) => Some(id),
                GitLabId::OnItsWay => None,
                GitLabId::Blocked => return None,
            };
            Some(ListingRegistry {
                position: registry.position_of(&name)?,
                name: registry.name,
                id,
            })
        })
        .collect();
    let chosen = registry_to_create_through(&mut listing)?;
    match chosen.id {
        Some(id) => Some(CreateThrough::Registry(id)),
        None if world.plans_creations() => {
            Some(CreateThrough::RegistryThisPlanCreates(chosen.name.clone()))
        }
        None => None,
    }
}

fn registry_to_create_through(listing: &mut [ListingRegistry]) -> Option<&ListingRegistry> {
    listing.sort_unstable();
    if let Some(first) = listing.iter().position(|registry| registry.position == 0) {
        return listing.get(first);
    }
    let position_in_first = listing.first()?.position;
    listing.get(position_in_first % listing.len())
}

/// The engine's input from the object, its credentials and the registries in the cluster.
/// Validation and the choice of registry are tested without a cluster.
pub fn request(
    upstream: &Upstream,
    credentials: Option<ResolvedCredentials>,
    world: &impl World,
    now: jiff::Timestamp,
) -> Result<UpstreamRequest> {
    let spec = &upstream.spec;
    let interval = parse_duration(&spec.connectivity_check.interval)
        .map_err(|error| Error::InvalidSpec(format!("connectivityCheck.interval: {error}")))?;
    let name = upstream.gitlab_name();
    let registry_for_create = create_through(upstream, world);
    let status = upstream.status.clone().unwrap_or_default();
    Ok(UpstreamRequest {
        desired: DesiredUpstream {
            group: PathOrId::parse(&spec.group),
            name,
            url: spec.url.clone(),
            description: spec.description.clone(),
            cache_validity_hours: i64::from(spec.cache_validity_hours),
            credentials,
            gate_changes: spec.connectivity_check.gate_changes,
            connectivity_interval: interval.max(Duration::from_secs(10)),
        },
        known: KnownUpstream {
            upstream_id: status.upstream_id,
            group_id: status.group_id,
            applied_credentials: status.applied_credentials.as_ref().map(credentials_version),
            last_check_configuration: status
                .last_connectivity_check
                .as_ref()
                .and_then(tested_configuration),
            last_check: status
                .last_connectivity_check
                .as_ref()
                .map(connectivity_check),
            last_handled_purge_cache: status.last_handled_purge_cache_at,
        },
        registry_for_create,
        purge_cache_request: upstream
            .annotations()
            .get(PURGE_CACHE_REQUESTED_AT)
            .cloned(),
        now,
        mode: Mode::Apply,
    })
}

/// The status to write after an engine run.
pub fn status(
    upstream: &Upstream,
    current: &UpstreamStatus,
    outcome: &UpstreamOutcome,
) -> UpstreamStatus {
    let generation = upstream.metadata.generation;
    let now = now();
    let mut status = current.clone();
    status.observed_generation = generation;
    status.upstream_id = outcome.upstream_id;
    status.group_id = outcome.group_id;
    status.applied_credentials = outcome
        .applied_credentials
        .as_ref()
        .map(applied_credentials);
    status.last_connectivity_check = recorded_check(
        current.last_connectivity_check.as_ref(),
        outcome_check(outcome),
    );
    status.last_handled_purge_cache_at = outcome.last_handled_purge_cache.clone();
    status.last_handled_reconcile_at = upstream.annotations().get(RECONCILE_REQUESTED_AT).cloned();
    conditions::set_condition(
        &mut status.conditions,
        outcome.synced.clone(),
        generation,
        &now,
    );
    let mut components = vec![SYNCED];
    if let Some(reachable) = &outcome.reachable {
        conditions::set_condition(&mut status.conditions, reachable.clone(), generation, &now);
        components.push(conditions::REACHABLE);
    }
    let ready = conditions::ready_summary(&status.conditions, &components);
    conditions::set_condition(&mut status.conditions, ready, generation, &now);
    status
}

/// A credentials Secret version as status records it, for the engine.
fn credentials_version(recorded: &AppliedCredentials) -> CredentialsVersion {
    CredentialsVersion {
        secret_name: recorded.secret_name.clone(),
        resource_version: recorded.resource_version.clone(),
    }
}

/// A credentials Secret version from the engine, as status records it.
fn applied_credentials(version: &CredentialsVersion) -> AppliedCredentials {
    AppliedCredentials {
        secret_name: version.secret_name.clone(),
        resource_version: version.resource_version.clone(),
    }
}

/// What a recorded test tested, for the engine; `None` when not recorded.
fn tested_configuration(check: &ConnectivityCheckResult) -> Option<TestedConfiguration> {
    Some(TestedConfiguration {
        url: check.url.clone()?,
        credentials: check.credentials.as_ref().map(credentials_version),
    })
}

/// A recorded test, for the engine.
fn connectivity_check(check: &ConnectivityCheckResult) -> ConnectivityCheck {
    ConnectivityCheck {
        time: check.time.0,
        success: check.success,
        result: check.result.clone(),
    }
}

/// Whether two tests tested the same configuration with the same result (their times aside).
fn same_result(a: &ConnectivityCheckResult, b: &ConnectivityCheckResult) -> bool {
    (a.success, &a.result, &a.url, &a.credentials) == (b.success, &b.result, &b.url, &b.credentials)
}

/// The last connection test as this process knows it. Status records a test's result with
/// the time that result was first seen (a periodic test with the same result writes
/// nothing); this process remembers the time of its latest test ([`LastConnectivityChecks`]).
/// The remembered test counts when it agrees with the status (same configuration, same
/// result, not older); else the status does (it changed behind us, or there is no memory
/// since a restart: the time of the last change is then taken as the last test's, so a test
/// is due early rather than a test older than the interval reused).
pub fn latest_check(
    recorded: Option<&ConnectivityCheckResult>,
    remembered: Option<&ConnectivityCheckResult>,
) -> Option<ConnectivityCheckResult> {
    match (recorded, remembered) {
        (Some(recorded), Some(remembered))
            if same_result(recorded, remembered) && remembered.time.0 >= recorded.time.0 =>
        {
            Some(remembered.clone())
        }
        (recorded, _) => recorded.cloned(),
    }
}

/// Lets the engine decide on `latest` ([`latest_check`]) instead of the test recorded in
/// status: whether a test is due, whether one within the interval can be reused.
pub fn with_latest_check(request: &mut UpstreamRequest, latest: Option<&ConnectivityCheckResult>) {
    request.known.last_check = latest.map(connectivity_check);
    request.known.last_check_configuration = latest.and_then(tested_configuration);
}

/// The test status records after an engine run: the current one, time included, while the
/// result and configuration stay the same; the new test when they change.
fn recorded_check(
    current: Option<&ConnectivityCheckResult>,
    latest: Option<ConnectivityCheckResult>,
) -> Option<ConnectivityCheckResult> {
    match (current, latest) {
        (Some(current), Some(latest)) if same_result(current, &latest) => Some(current.clone()),
        (_, latest) => latest,
    }
}

/// The test an engine run ends with, as status records it (with its own time).
pub fn outcome_check(outcome: &UpstreamOutcome) -> Option<ConnectivityCheckResult> {
    outcome
        .last_check
        .as_ref()
        .map(|check| ConnectivityCheckResult {
            time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(check.time),
            success: check.success,
            result: check.result.clone(),
            url: outcome
                .last_check_configuration
                .as_ref()
                .map(|tested| tested.url.clone()),
            credentials: outcome
                .last_check_configuration
                .as_ref()
                .and_then(|tested| tested.credentials.as_ref())
                .map(applied_credentials),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::conditions::{ConditionUpdate, READY};
    use crate::crd::virtual_registry::VirtualRegistryStatus;
    use crate::crd::{DeletionPolicy, LocalObjectReference, VirtualRegistry, VirtualRegistrySpec};
    use crate::resolve::Objects;

    /// The request with `registries` as the cluster's registries.
    fn build_request<'a>(
        upstream: &Upstream,
        credentials: Option<ResolvedCredentials>,
        registries: impl Iterator<Item = &'a VirtualRegistry>,
        now: jiff::Timestamp,
    ) -> Result<UpstreamRequest> {
        let world = Objects {
            registries: registries.collect(),
            ..Default::default()
        };
        request(upstream, credentials, &world, now)
    }

    fn upstream(yaml: &str) -> Upstream {
        serde_saphyr::from_str(yaml).expect("valid Upstream")
    }

    fn registry(name: &str, group: &str, upstreams: &[&str], id: Option<i64>) -> VirtualRegistry {
        let mut registry = VirtualRegistry::new(
            name,
            VirtualRegistrySpec {
                group: group.into(),
                name: None,
                description: None,
                upstreams: upstreams
                    .iter()
                    .map(|u| LocalObjectReference { name: (*u).into() })
                    .collect(),
                deletion_policy: DeletionPolicy::Delete,
                suspend: false,
                gitlab: None,
            },
        );
        registry.metadata.namespace = Some("team".into());
        registry.status = Some(VirtualRegistryStatus {
            registry_id: id,
            ..Default::default()
        });
        registry
    }

    const DOCKERHUB: &str = "apiVersion: gitlabregistry.io/v1alpha1\nkind: Upstream\nmetadata: {name: dockerhub, namespace: team, generation: 2}\nspec: {group: my-org, url: 'https://registry-1.docker.io'}\n";

    fn listing(name: &str, position: usize, id: Option<i64>) -> ListingRegistry {
        ListingRegistry {
            name: name.into(),
            position,
            id,
        }
    }

    fn through(mut listing: Vec<ListingRegistry>) -> Option<i64> {
        registry_to_create_through(&mut listing).and_then(|chosen| chosen.id)
    }

    #[test]
    fn creates_go_through_a_registry_listing_the_upstream_first_else_spread_by_position() {
        let first = vec![listing("a", 1, Some(5)), listing("b", 0, Some(6))];
        assert_eq!(through(first), Some(6));
        // Listed third everywhere: the third of the registries by name.
        let third = vec![
            listing("c", 2, Some(1)),
            listing("a", 2, Some(3)),
            listing("b", 2, Some(2)),
        ];
        assert_eq!(through(third), Some(1));
        // Five registries listing the same five Upstreams: one create into each, the same
        // whether or not the others have their ids yet.
        let names = ["r0", "r1", "r2", "r3", "r4"];
        let spread: Vec<_> = (0..5)
            .map(|position| {
                through(
                    names
                        .iter()
                        .zip(10..)
                        .map(|(name, id)| listing(name, position, Some(id)))
                        .collect(),
                )
            })
            .collect();
        assert_eq!(spread, [Some(10), Some(11), Some(12), Some(13), Some(14)]);
        let only_r1_has_an_id = |position| {
            through(
                names
                    .iter()
                    .map(|name| listing(name, position, (*name == "r1").then_some(11)))
                    .collect(),
            )
        };
        assert_eq!(only_r1_has_an_id(1), Some(11));
        assert_eq!(only_r1_has_an_id(3), None, "waits for r3");
        assert_eq!(through(Vec::new()), None);
    }
    #[test]
    fn creates_through_the_first_registry_by_name_of_the_same_group_and_namespace_listing_it() {
        let upstream = upstream(DOCKERHUB);
        let mut registries = [
            registry("a", "my-org", &["dockerhub"], Some(9)),
            registry("b", "my-org", &["dockerhub"], Some(4)),
            registry("c", "other-org", &["dockerhub"], Some(1)),
            registry("d", "my-org", &["quay"], Some(2)),
            registry("e", "my-org", &["dockerhub"], None),
        ];
        let through = |registries: &[VirtualRegistry]| {
            build_request(
                &upstream,
                None,
                registries.iter(),
                jiff::Timestamp::UNIX_EPOCH,
            )
            .expect("valid")
            .registry_for_create
        };
        assert_eq!(through(&registries), Some(CreateThrough::Registry(9)));

        // `a` still being created: wait for it, whichever registry got its id first.
        registries[0].status = None;
        assert_eq!(through(&registries), None);
        // `a` failed before it got an id, or is suspended: not waited for.
        let failing = ConditionUpdate::new(SYNCED, false, "LimitExceeded", "5 registries");
        let mut status = VirtualRegistryStatus::default();
        conditions::set_condition(&mut status.conditions, failing, Some(1), &now());
        registries[0].status = Some(status);
        assert_eq!(through(&registries), Some(CreateThrough::Registry(4)));
        registries[0].status = None;
        registries[0].spec.suspend = true;
        assert_eq!(through(&registries), Some(CreateThrough::Registry(4)));

        let request = build_request(
            &upstream,
            None,
            registries.iter(),
            jiff::Timestamp::UNIX_EPOCH,
        )
        .expect("valid");
        assert_eq!(request.desired.name, "dockerhub");
        assert_eq!(
            request.desired.connectivity_interval,
            Duration::from_secs(600)
        );
        let none = build_request(
            &upstream,
            None,
            registries[2..].iter(),
            jiff::Timestamp::UNIX_EPOCH,
        )
        .expect("valid");
        assert_eq!(none.registry_for_create, None);
    }

    #[test]
    fn a_bad_interval_is_invalid_spec_naming_the_field() {
        let upstream =
            upstream(&DOCKERHUB.replace("url:", "connectivityCheck: {interval: soon}, url:"));
        let error = build_request(
            &upstream,
            None,
            std::iter::empty(),
            jiff::Timestamp::UNIX_EPOCH,
        )
        .expect_err("refused");
        assert_eq!(error.reason(), "InvalidSpec");
        assert!(
            error.to_string().contains("connectivityCheck.interval"),
            "{error}"
        );
    }

    #[test]
    fn status_summarises_synced_and_reachable_into_ready() {
        let upstream = upstream(DOCKERHUB);
        let outcome = UpstreamOutcome {
            upstream_id: Some(5),
            group_id: Some(100),
            applied_credentials: None,
            last_check: Some(ConnectivityCheck {
                time: jiff::Timestamp::UNIX_EPOCH,
                success: false,
                result: Some("Error: 401 - Unauthorized".into()),
            }),
            last_check_configuration: None,
            last_handled_purge_cache: None,
            synced: ConditionUpdate::new(SYNCED, true, "Synced", "ok"),
            reachable: Some(ConditionUpdate::new(
                conditions::REACHABLE,
                false,
                "Unauthorized",
                "Error: 401 - Unauthorized",
            )),
            actions: Vec::new(),
            error: None,
            next_check_in: None,
        };
        let status = status(&upstream, &UpstreamStatus::default(), &outcome);
        assert_eq!(status.upstream_id, Some(5));
        assert_eq!(status.observed_generation, Some(2));
        let ready = conditions::find(&status.conditions, READY).expect("Ready set");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Unauthorized")
        );
        // Same outcome again: the status is equal, so no patch would be sent.
        let again = super::status(&upstream, &status, &outcome);
        assert_eq!(again, status);
    }
    fn check_at(second: i64, success: bool) -> ConnectivityCheckResult {
        ConnectivityCheckResult {
            time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                jiff::Timestamp::from_second(second).expect("valid"),
            ),
            success,
            result: (!success).then(|| "Error: 401 - Unauthorized".to_string()),
            url: Some("https://registry-1.docker.io".into()),
            credentials: None,
        }
    }

    fn checked(check: &ConnectivityCheckResult) -> UpstreamOutcome {
        UpstreamOutcome {
            upstream_id: Some(5),
            group_id: Some(100),
            applied_credentials: None,
            last_check: Some(connectivity_check(check)),
            last_check_configuration: tested_configuration(check),
            last_handled_purge_cache: None,
            synced: ConditionUpdate::new(SYNCED, true, "Synced", "ok"),
            reachable: Some(crate::sync::upstream::reachable_condition(
                &connectivity_check(check),
            )),
            actions: Vec::new(),
            error: None,
            next_check_in: None,
        }
    }

    #[test]
    fn a_periodic_test_with_the_same_result_leaves_the_status_as_it_is() {
        let upstream = upstream(DOCKERHUB);
        let first = status(
            &upstream,
            &UpstreamStatus::default(),
            &checked(&check_at(1_000, true)),
        );
        let again = status(&upstream, &first, &checked(&check_at(1_600, true)));
        assert_eq!(again, first, "no patch: the result did not change");
        assert_eq!(
            first.last_connectivity_check.as_ref().map(|c| c.time.0),
            Some(jiff::Timestamp::from_second(1_000).expect("valid")),
            "the time the result was first seen"
        );

        let failed = status(&upstream, &first, &checked(&check_at(2_200, false)));
        let recorded = failed.last_connectivity_check.as_ref().expect("a test");
        assert_eq!(
            (recorded.success, recorded.time.0.as_second()),
            (false, 2_200)
        );
        let ready = conditions::find(&failed.conditions, READY).expect("Ready");
        assert_eq!(ready.reason, "Unauthorized");
    }

    #[test]
    fn the_latest_test_is_the_remembered_one_while_it_agrees_with_the_status() {
        let recorded = check_at(1_000, true);
        let remembered = check_at(1_600, true);
        assert_eq!(
            latest_check(Some(&recorded), Some(&remembered)),
            Some(remembered.clone())
        );
        // No memory (a restart): the time of the last change stands in, so a test is due
        // early rather than one older than the interval reused.
        assert_eq!(latest_check(Some(&recorded), None), Some(recorded.clone()));
        // The status changed behind this process (another result, or no test at all).
        let failed = check_at(2_000, false);
        assert_eq!(latest_check(Some(&failed), Some(&remembered)), Some(failed));
        assert_eq!(latest_check(None, Some(&remembered)), None);
        // Another url was tested since.
        let mut elsewhere = remembered.clone();
        elsewhere.url = Some("https://quay.io".into());
        assert_eq!(
            latest_check(Some(&recorded), Some(&elsewhere)),
            Some(recorded.clone())
        );

        let mut request = build_request(
            &upstream(DOCKERHUB),
            None,
            std::iter::empty(),
            jiff::Timestamp::from_second(1_700).expect("valid"),
        )
        .expect("valid");
        with_latest_check(&mut request, Some(&remembered));
        assert_eq!(
            request.known.last_check.map(|check| check.time.as_second()),
            Some(1_600),
            "the engine decides whether a test is due on the latest one"
        );
        assert_eq!(
            request
                .known
                .last_check_configuration
                .map(|tested| tested.url),
            Some("https://registry-1.docker.io".to_string())
        );
    }
}
