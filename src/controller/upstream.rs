//! The Upstream controller: dereference (connection, credentials Secret, a registry to create
//! through) → validate → the `sync::upstream` engine, reading from the shared group listings
//! when nothing changed since the last reconcile → status and Events.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use super::connection::{Connection, gitlab_connection, read_secret, secret_key};
use super::status::{
    apply_status, mark_failed, mark_suspended, nothing_requested_since, publish, publish_outcome,
};
use super::world::Stores;
use super::{Context, Error, Result, reconciler, tenancy};
use crate::crd::conditions::{self, SYNCED};
use crate::crd::upstream::ConnectivityCheckResult;
use crate::crd::{DeletionPolicy, Upstream, UpstreamStatus};
use crate::gitlab::{PathOrId, UpstreamCredentials};
use crate::resolve;
pub use crate::resolve::upstream::{latest_check, outcome_check, with_latest_check};
use crate::sync::listing::UpstreamListings;
use crate::sync::registry::RegistryViews;
use crate::sync::upstream::{
    CredentialsVersion, ResolvedCredentials, SharedListing, UpstreamOutcome,
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
            let status = resolve::upstream::status(upstream, &current, &outcome);
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
    let mut request = resolve::upstream::request(
        upstream,
        credentials,
        &Stores::of(ctx),
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
    use crate::crd::RECONCILE_REQUESTED_AT;
    use crate::crd::conditions::ConditionUpdate;
    use crate::resolve::stamp::now;

    fn upstream(yaml: &str) -> Upstream {
        serde_saphyr::from_str(yaml).expect("valid Upstream")
    }

    const DOCKERHUB: &str = "apiVersion: gitlabregistry.io/v1alpha1\nkind: Upstream\nmetadata: {name: dockerhub, namespace: team, generation: 2}\nspec: {group: my-org, url: 'https://registry-1.docker.io'}\n";

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
}
