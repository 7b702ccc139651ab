//! What every kind's reconcile shares: the finalizer (GitLab cleanup on deletion), metrics,
//! and the error policy with per-object backoff. Each kind supplies its apply and cleanup.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use kube::runtime::controller::Action as Requeue;
use kube::runtime::finalizer::{self, Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::{CONFLICT_RETRY, finalizer_patch_error, retry_delay};
use super::{Context, Error, Result};
use crate::crd::FINALIZER;

fn object_key<K: Resource<DynamicType = ()>>(object: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

/// Runs `apply` (or, once the object is being deleted, `cleanup`) behind the finalizer, and
/// records the reconcile in metrics and in the object's failure count. Nothing starts before
/// the stores the reconciles read are synced ([`Context::stores_synced`]): on a restart a
/// controller starts once its own store is listed, while the other kind's list is still
/// arriving.
pub async fn reconcile<K, ApplyFuture, CleanupFuture>(
    object: Arc<K>,
    ctx: Arc<Context>,
    apply: impl FnOnce(Arc<K>, Arc<Context>, Api<K>) -> ApplyFuture,
    cleanup: impl FnOnce(Arc<K>, Arc<Context>) -> CleanupFuture,
) -> Result<Requeue>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + Debug,
    ApplyFuture: Future<Output = Result<Requeue>>,
    CleanupFuture: Future<Output = Result<Requeue>>,
{
    ctx.stores_synced().await;
    let kind = K::kind(&());
    let started = Instant::now();
    ctx.metrics.reconcile_started(&kind);
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &object.namespace().unwrap_or_default());
    let key = object_key(object.as_ref());
    let result = finalizer(&api, FINALIZER, object, |event| async {
        match event {
            Finalizer::Apply(object) => apply(object, ctx.clone(), api.clone()).await,
            Finalizer::Cleanup(object) => cleanup(object, ctx.clone()).await,
        }
    })
    .await
    .map_err(|error| match error {
        finalizer::Error::ApplyFailed(inner) | finalizer::Error::CleanupFailed(inner) => inner,
        finalizer::Error::AddFinalizer(error) | finalizer::Error::RemoveFinalizer(error) => {
            finalizer_patch_error(error)
        }
        other => Error::Finalizer(other.to_string()),
    });
    // A conflict is neither a success nor an error: the retry decides.
    let error_reason = result
        .as_ref()
        .err()
        .filter(|error| !error.is_conflict())
        .map(Error::reason);
    ctx.metrics
        .reconcile_finished(&kind, started.elapsed(), error_reason);
    if result.is_ok() {
        ctx.record_success(&key);
    }
    result
}

/// Conflicts are retried promptly (logged at debug); transient errors back off per object;
/// permanent ones wait for a change or the resync.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    object: Arc<K>,
    error: &Error,
    ctx: Arc<Context>,
) -> Requeue {
    if error.is_conflict() {
        tracing::debug!(
            kind = %K::kind(&()),
            namespace = object.namespace().unwrap_or_default(),
            name = object.name_any(),
            %error,
            "conflict with another write: retrying"
        );
        return Requeue::requeue(CONFLICT_RETRY);
    }
    let attempt = ctx.record_failure(&object_key(object.as_ref()));
    tracing::warn!(
        kind = %K::kind(&()),
        namespace = object.namespace().unwrap_or_default(),
        name = object.name_any(),
        reason = error.reason(),
        %error,
        "reconcile failed"
    );
    Requeue::requeue(retry_delay(
        error,
        attempt.saturating_sub(1),
        ctx.config.resync,
    ))
}
