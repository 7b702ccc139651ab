//! The VirtualRegistry controller: dereference (connection, the listed Upstreams' GitLab ids)
//! → the `sync::registry` engine → status and Events. On deletion with policy `Delete`,
//! upstreams whose objects still exist are disassociated first so GitLab keeps them.

use std::sync::Arc;

use kube::runtime::controller::Action as Requeue;
use kube::{Api, ResourceExt};

use super::connection::{Connection, gitlab_connection};
use super::status::{apply_status, mark_failed, mark_suspended, publish_actions, publish_outcome};
use super::world::Stores;
use super::{Context, Error, Result, reconciler, tenancy};
use crate::crd::{DeletionPolicy, VirtualRegistry};
use crate::gitlab::PathOrId;
use crate::resolve;
use crate::sync::registry::SharedViews;
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
        let request = resolve::registry::request(registry, &Stores::of(ctx));
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
            let status = resolve::registry::status(registry, &current, &outcome);
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
    let keep = resolve::registry::upstream_ids_to_keep(registry, &Stores::of(ctx));
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
