//! The Upstream controller: dereference (connection, credentials Secret, a registry to create
//! through) → validate → the `sync::upstream` engine, reading from the shared group listings
//! when nothing changed since the last reconcile → status and Events.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};

use super::connection::{Connection, gitlab_connection, read_secret, secret_key};
use super::status::{
    apply_status, mark_failed, mark_suspended, nothing_requested_since, now, publish,
    publish_outcome,
};
use super::{Context, Error, Result, reconciler, tenancy};
use crate::cleanup::parse_duration;
use crate::crd::conditions::{self, SYNCED};
use crate::crd::upstream::{AppliedCredentials, ConnectivityCheckResult};
use crate::crd::{
    DeletionPolicy, PURGE_CACHE_REQUESTED_AT, RECONCILE_REQUESTED_AT, Upstream, UpstreamStatus,
    VirtualRegistry,
};
use crate::gitlab::{PathOrId, UpstreamCredentials};
use crate::sync::listing::UpstreamListings;
use crate::sync::registry::RegistryViews;
use crate::sync::upstream::{
    ConnectivityCheck, CredentialsVersion, DesiredUpstream, KnownUpstream, ResolvedCredentials,
    SharedListing, TestedConfiguration, UpstreamOutcome, UpstreamRequest,
};
use crate::sync::{self, Mode};

pub async fn reconcile(upstream: Arc<Upstream>, ctx: Arc<Context>) -> Result<Requeue> {
    reconciler::reconcile(
        upstream,
        ctx,
        |upstream, ctx, api| async move { apply(&upstream, &ctx, &api).await },
        |upstream, ctx| async move { cleanup(&upstream, &ctx).await },
    )
    .await
}

pub fn error_policy(upstream: Arc<Upstream>, error: &Error, ctx: Arc<Context>) -> Requeue {
    reconciler::error_policy(upstream, error, ctx)
}

async fn apply(upstream: &Upstream, ctx: &Context, api: &Api<Upstream>) -> Result<Requeue> {
    let current = upstream.status.clone().unwrap_or_default();
    let generation = upstream.metadata.generation;
    if upstream.spec.suspend {
        let status = suspended_status(&current, generation);
        record_reachability(ctx, upstream, None);
        apply_status(api, upstream, upstream.status.as_ref(), &status).await?;
        return Ok(Requeue::await_change());
    }
    match dereference_and_sync(upstream, ctx).await {
        Ok(outcome) => {
            remember_check(ctx, upstream, &outcome);
            let status = status_from_outcome(upstream, &current, &outcome);
            record_reachability(ctx, upstream, reachability(&status));
            apply_status(api, upstream, upstream.status.as_ref(), &status).await?;
            publish_outcome(ctx, upstream, &outcome.actions, outcome.error.as_ref()).await;
            if let Some(error) = outcome.error {
                return Err(Error::Sync(error));
            }
            let next = outcome
                .next_check_in
                .map_or(ctx.config.resync, |d| d.min(ctx.config.resync));
            Ok(Requeue::requeue(next))
        }
        Err(error) => {
            let mut status = current.clone();
            status.observed_generation = generation;
            mark_failed(&mut status.conditions, &error, generation);
            record_reachability(ctx, upstream, reachability(&status));
            apply_status(api, upstream, upstream.status.as_ref(), &status).await?;
            Err(error)
        }
    }
}

/// What the `Reachable` condition of `status` says: `None` before the first connection test.
/// Pure.
fn reachability(status: &UpstreamStatus) -> Option<bool> {
    match conditions::find(&status.conditions, conditions::REACHABLE)?
        .status
        .as_str()
    {
        "True" => Some(true),
        "False" => Some(false),
        _ => None,
    }
}

fn record_reachability(ctx: &Context, upstream: &Upstream, reachable: Option<bool>) {
    ctx.metrics.upstream_reachability(
        &upstream.namespace().unwrap_or_default(),
        &upstream.name_any(),
        reachable,
    );
}

/// Everything the engine needs, read from the cluster, then one engine run.
async fn dereference_and_sync(upstream: &Upstream, ctx: &Context) -> Result<UpstreamOutcome> {
    tenancy::check_upstream(ctx, upstream)?;
    let namespace = upstream.namespace().unwrap_or_default();
    let Connection { client, key } =
        gitlab_connection(ctx, &namespace, upstream.spec.gitlab.as_ref()).await?;
    let credentials = match &upstream.spec.credentials_secret_ref {
        None => None,
        Some(reference) => {
            let secret = read_secret(ctx, &namespace, &reference.name).await?;
            let username = secret_key(&secret, &namespace, &reference.username_key)?;
            let password = secret_key(&secret, &namespace, &reference.password_key)?;
            use secrecy::ExposeSecret;
            // Nothing is sent while the Secret holds `export`'s placeholder: the controller
            // keeps no record that would tell when GitLab's password may be left alone.
            if password.value.expose_secret() == crate::crd::upstream::PLACEHOLDER_PASSWORD {
                return Err(Error::PlaceholderPassword {
                    namespace,
                    name: reference.name.clone(),
                    key: reference.password_key.clone(),
                });
            }
            Some(ResolvedCredentials {
                credentials: UpstreamCredentials::new(
                    username.value.expose_secret(),
                    password.value,
                ),
                version: CredentialsVersion {
                    secret_name: reference.name.clone(),
                    resource_version: username.resource_version,
                },
            })
        }
    };
    let registries = ctx.registries.state();
    let mut request = build_request(
        upstream,
        credentials,
        registries.iter().map(|r| r.as_ref()),
        jiff::Timestamp::now(),
    )?;
    let latest = latest_check(
        upstream
            .status
            .as_ref()
            .and_then(|status| status.last_connectivity_check.as_ref()),
        ctx.last_connectivity_checks
            .get(&check_key(upstream))
            .as_ref(),
    );
    with_latest_check(&mut request, latest.as_ref());
    let listing = shared_listing(upstream, &ctx.upstream_listings, &ctx.registry_views, &key);
    Ok(sync::upstream::reconcile_with_listing(&client, &request, Some(listing)).await)
}

/// The engine's access to the shared group listings for one reconcile of `upstream`.
pub fn shared_listing<'a>(
    upstream: &Upstream,
    listings: &'a UpstreamListings,
    registry_views: &'a RegistryViews,
    connection: &'a str,
) -> SharedListing<'a> {
    SharedListing {
        listings,
        connection,
        nothing_changed: nothing_changed_since_last_reconcile(upstream),
        registry_views: Some(registry_views),
    }
}

/// Whether nothing is known to have changed since the last reconcile wrote the status: its
/// spec generation was observed, it was in sync, and no reconcile was requested since. Only
/// then may the engine read the upstream from a group listing. Pure.
pub fn nothing_changed_since_last_reconcile(upstream: &Upstream) -> bool {
    let Some(status) = &upstream.status else {
        return false;
    };
    conditions::is_true(&status.conditions, SYNCED)
        && nothing_requested_since(
            upstream,
            status.observed_generation,
            status.last_handled_reconcile_at.as_ref(),
        )
}

/// A registry that lists the Upstream and has a GitLab id, or is on its way to one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ListingRegistry {
    name: String,
    /// The Upstream's position in the registry's list.
    position: usize,
    id: Option<i64>,
}

/// The registry an Upstream is created through, chosen among the registries that list it
/// (including those still being created, so the choice does not depend on which registry
/// got its id first): one that lists it first, since the create puts it at position 1 where
/// it belongs; else the Upstreams are spread over the registries by their position in the
/// first registry by name, so creates go to different registries and run at once (GitLab
/// takes one insert at a time per registry), each registry moving at most its one created
/// member into place afterwards. `None` while the chosen registry has no id yet: the
/// Upstream waits for it (its id triggers the next reconcile). Pure, and the same for every
/// reconcile while the registries do not change.
fn registry_to_create_through(mut listing: Vec<ListingRegistry>) -> Option<i64> {
    listing.sort_unstable();
    if let Some(first) = listing.iter().find(|registry| registry.position == 0) {
        return first.id;
    }
    let position_in_first = listing.first()?.position;
    listing.get(position_in_first % listing.len())?.id
}

/// Whether a registry without a GitLab id is getting one: not suspended, and not failed.
fn on_its_way_to_an_id(registry: &VirtualRegistry) -> bool {
    let failed = registry
        .status
        .as_ref()
        .is_some_and(|status| conditions::false_reason(&status.conditions, SYNCED).is_some());
    !registry.spec.suspend && !failed
}

/// The engine's input from the object, its credentials and the registries in the cluster.
/// Pure: validation and the choice of registry are tested without a cluster.
pub fn build_request<'a>(
    upstream: &Upstream,
    credentials: Option<ResolvedCredentials>,
    registries: impl Iterator<Item = &'a VirtualRegistry>,
    now: jiff::Timestamp,
) -> Result<UpstreamRequest> {
    let spec = &upstream.spec;
    let interval = parse_duration(&spec.connectivity_check.interval)
        .map_err(|error| Error::InvalidSpec(format!("connectivityCheck.interval: {error}")))?;
    let name = upstream.gitlab_name();
    let namespace = upstream.namespace();
    let listing: Vec<ListingRegistry> = registries
        .filter(|registry| {
            registry.namespace() == namespace && registry.meta().deletion_timestamp.is_none()
        })
        .filter(|registry| registry.spec.group == spec.group)
        .filter_map(|registry| {
            let id = registry.status.as_ref().and_then(|s| s.registry_id);
            if id.is_none() && !on_its_way_to_an_id(registry) {
                return None;
            }
            let position = registry
                .spec
                .upstreams
                .iter()
                .position(|u| u.name == upstream.name_any())?;
            Some(ListingRegistry {
                name: registry.name_any(),
                position,
                id,
            })
        })
        .collect();
    let registry_for_create = registry_to_create_through(listing);
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
/// is due early rather than a test older than the interval reused). Pure.
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
/// result and configuration stay the same; the new test when they change. Pure.
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

/// The latest connection test of each Upstream this process ran or read, by
/// `namespace/name`: what status no longer records (the time of a test with an unchanged
/// result), exported as `upstream_last_connectivity_check_timestamp_seconds`.
#[derive(Default)]
pub struct LastConnectivityChecks {
    checks: Mutex<HashMap<String, ConnectivityCheckResult>>,
}

impl LastConnectivityChecks {
    pub fn get(&self, upstream: &str) -> Option<ConnectivityCheckResult> {
        self.lock().get(upstream).cloned()
    }

    pub fn remember(&self, upstream: &str, check: ConnectivityCheckResult) {
        self.lock().insert(upstream.to_owned(), check);
    }

    pub fn forget(&self, upstream: &str) {
        self.lock().remove(upstream);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ConnectivityCheckResult>> {
        self.checks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The key of `upstream` in [`LastConnectivityChecks`].
fn check_key(upstream: &Upstream) -> String {
    format!(
        "{}/{}",
        upstream.namespace().unwrap_or_default(),
        upstream.name_any()
    )
}

/// Remembers the test an engine run ended with and exports its time.
fn remember_check(ctx: &Context, upstream: &Upstream, outcome: &UpstreamOutcome) {
    if let Some(check) = outcome_check(outcome) {
        ctx.metrics.connectivity_checked(
            &upstream.namespace().unwrap_or_default(),
            &upstream.name_any(),
            check.time.0,
        );
        ctx.last_connectivity_checks
            .remember(&check_key(upstream), check);
    }
}

/// The status to write after an engine run. Pure.
pub fn status_from_outcome(
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

fn suspended_status(current: &UpstreamStatus, generation: Option<i64>) -> UpstreamStatus {
    let mut status = current.clone();
    status.observed_generation = generation;
    mark_suspended(
        &mut status.conditions,
        generation,
        "spec.suspend is true: nothing is sent to GitLab",
    );
    status
}

async fn cleanup(upstream: &Upstream, ctx: &Context) -> Result<Requeue> {
    record_reachability(ctx, upstream, None);
    ctx.last_connectivity_checks.forget(&check_key(upstream));
    ctx.metrics.forget_upstream(
        &upstream.namespace().unwrap_or_default(),
        &upstream.name_any(),
    );
    let upstream_id = upstream.status.as_ref().and_then(|s| s.upstream_id);
    let Some(upstream_id) =
        upstream_id.filter(|_| upstream.spec.deletion_policy == DeletionPolicy::Delete)
    else {
        return Ok(Requeue::await_change());
    };
    let checked = tenancy::check_upstream(ctx, upstream);
    if !tenancy::may_clean_up_in_gitlab(checked, "Upstream", &upstream.name_any()) {
        return Ok(Requeue::await_change());
    }
    let namespace = upstream.namespace().unwrap_or_default();
    let Connection { client, key } =
        gitlab_connection(ctx, &namespace, upstream.spec.gitlab.as_ref()).await?;
    let deleted = sync::upstream::delete(&client, upstream_id, Mode::Apply).await;
    ctx.upstream_listings.record_write(
        &key,
        &PathOrId::parse(&upstream.spec.group),
        Some(upstream_id),
    );
    let action = deleted?;
    publish(
        ctx,
        upstream,
        EventType::Normal,
        action.reason,
        &action.message,
    )
    .await;
    Ok(Requeue::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::conditions::{ConditionUpdate, READY};
    use crate::crd::virtual_registry::VirtualRegistryStatus;
    use crate::crd::{LocalObjectReference, VirtualRegistrySpec};

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
        assert_eq!(through(&registries), Some(9));

        // `a` still being created: wait for it, whichever registry got its id first.
        registries[0].status = None;
        assert_eq!(through(&registries), None);
        // `a` failed before it got an id, or is suspended: not waited for.
        let failing = ConditionUpdate::new(SYNCED, false, "LimitExceeded", "5 registries");
        let mut status = VirtualRegistryStatus::default();
        conditions::set_condition(&mut status.conditions, failing, Some(1), &now());
        registries[0].status = Some(status);
        assert_eq!(through(&registries), Some(4));
        registries[0].status = None;
        registries[0].spec.suspend = true;
        assert_eq!(through(&registries), Some(4));

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

    fn listing(name: &str, position: usize, id: Option<i64>) -> ListingRegistry {
        ListingRegistry {
            name: name.into(),
            position,
            id,
        }
    }

    #[test]
    fn creates_go_through_a_registry_listing_the_upstream_first_else_spread_by_position() {
        let first = vec![listing("a", 1, Some(5)), listing("b", 0, Some(6))];
        assert_eq!(registry_to_create_through(first), Some(6));
        // Listed third everywhere: the third of the registries by name.
        let third = vec![
            listing("c", 2, Some(1)),
            listing("a", 2, Some(3)),
            listing("b", 2, Some(2)),
        ];
        assert_eq!(registry_to_create_through(third), Some(1));
        // Five registries listing the same five Upstreams: one create into each, the same
        // whether or not the others have their ids yet.
        let names = ["r0", "r1", "r2", "r3", "r4"];
        let through: Vec<_> = (0..5)
            .map(|position| {
                registry_to_create_through(
                    names
                        .iter()
                        .zip(10..)
                        .map(|(name, id)| listing(name, position, Some(id)))
                        .collect(),
                )
            })
            .collect();
        assert_eq!(through, [Some(10), Some(11), Some(12), Some(13), Some(14)]);
        let only_r1_has_an_id = |position| {
            registry_to_create_through(
                names
                    .iter()
                    .map(|name| listing(name, position, (*name == "r1").then_some(11)))
                    .collect(),
            )
        };
        assert_eq!(only_r1_has_an_id(1), Some(11));
        assert_eq!(only_r1_has_an_id(3), None, "waits for r3");
        assert_eq!(registry_to_create_through(Vec::new()), None);
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
    fn only_a_settled_upstream_may_be_read_from_a_listing() {
        let mut upstream = upstream(DOCKERHUB);
        assert!(
            !nothing_changed_since_last_reconcile(&upstream),
            "never reconciled"
        );
        let synced = ConditionUpdate::new(SYNCED, true, "Synced", "ok");
        let mut status = UpstreamStatus {
            observed_generation: Some(2),
            upstream_id: Some(5),
            ..Default::default()
        };
        conditions::set_condition(&mut status.conditions, synced, Some(2), &now());
        upstream.status = Some(status.clone());
        assert!(nothing_changed_since_last_reconcile(&upstream));

        let mut spec_changed = upstream.clone();
        spec_changed.metadata.generation = Some(3);
        assert!(!nothing_changed_since_last_reconcile(&spec_changed));

        let mut requested = upstream.clone();
        requested
            .annotations_mut()
            .insert(RECONCILE_REQUESTED_AT.into(), "now".into());
        assert!(!nothing_changed_since_last_reconcile(&requested));
        let status = requested.status.as_mut().expect("status");
        status.last_handled_reconcile_at = Some("now".into());
        assert!(nothing_changed_since_last_reconcile(&requested));

        let mut failed = upstream.clone();
        let failing = ConditionUpdate::new(SYNCED, false, "GitLabUnavailable", "503");
        let status = failed.status.as_mut().expect("status");
        conditions::set_condition(&mut status.conditions, failing, Some(2), &now());
        assert!(!nothing_changed_since_last_reconcile(&failed));
    }

    #[test]
    fn listings_are_shared_only_by_objects_using_the_same_token() {
        let url: url::Url = "https://gitlab.example.com".parse().expect("url");
        let listing_connection = |upstream: &Upstream, token_version: Option<&str>| {
            super::super::connection::connection_key(
                &url,
                &upstream.namespace().unwrap_or_default(),
                upstream.spec.gitlab.as_ref(),
                token_version,
            )
        };
        let default = upstream(DOCKERHUB);
        let mut other_namespace = default.clone();
        other_namespace.metadata.namespace = Some("other".into());
        assert_eq!(
            listing_connection(&default, None),
            listing_connection(&other_namespace, None),
            "the operator's default token"
        );
        let own_token = upstream(&DOCKERHUB.replace(
            "spec: {",
            "spec: {gitlab: {url: 'https://gitlab.example.com', tokenSecretRef: {name: gitlab-token, key: token}}, ",
        ));
        let mut own_token_elsewhere = own_token.clone();
        own_token_elsewhere.metadata.namespace = Some("other".into());
        let connections = [
            listing_connection(&default, None),
            listing_connection(&own_token, Some("41")),
            listing_connection(&own_token_elsewhere, Some("41")),
            listing_connection(&own_token, Some("42")),
        ];
        assert_ne!(connections[0], connections[1]);
        assert_ne!(
            connections[1], connections[2],
            "a Secret of another namespace"
        );
        assert_ne!(connections[1], connections[3], "a rotated token");
        assert_eq!(connections[1], listing_connection(&own_token, Some("41")));
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
        let status = status_from_outcome(&upstream, &UpstreamStatus::default(), &outcome);
        assert_eq!(status.upstream_id, Some(5));
        assert_eq!(status.observed_generation, Some(2));
        let ready = conditions::find(&status.conditions, READY).expect("Ready set");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Unauthorized")
        );
        // Same outcome again: the status is equal, so no patch would be sent.
        let again = status_from_outcome(&upstream, &status, &outcome);
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
            reachable: Some(sync::upstream::reachable_condition(&connectivity_check(
                check,
            ))),
            actions: Vec::new(),
            error: None,
            next_check_in: None,
        }
    }

    #[test]
    fn a_periodic_test_with_the_same_result_leaves_the_status_as_it_is() {
        let upstream = upstream(DOCKERHUB);
        let first = status_from_outcome(
            &upstream,
            &UpstreamStatus::default(),
            &checked(&check_at(1_000, true)),
        );
        let again = status_from_outcome(&upstream, &first, &checked(&check_at(1_600, true)));
        assert_eq!(again, first, "no patch: the result did not change");
        assert_eq!(
            first.last_connectivity_check.as_ref().map(|c| c.time.0),
            Some(jiff::Timestamp::from_second(1_000).expect("valid")),
            "the time the result was first seen"
        );

        let failed = status_from_outcome(&upstream, &first, &checked(&check_at(2_200, false)));
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
