//! Writing back: status by server-side apply (only when it changed) and Events for what a
//! reconcile did.

use crate::crd::reasons::Reason;
use std::fmt::Debug;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Context, FIELD_MANAGER, Result};
use crate::crd::conditions::{self, ConditionUpdate, READY, SYNCED, Status};
use crate::sync::Action;

pub use crate::resolve::stamp::{nothing_requested_since, now};

/// Applies `status` with the operator's field manager, unless it equals `current`.
/// Returns whether a patch was sent.
pub async fn apply_status<K, S>(
    api: &Api<K>,
    object: &K,
    current: Option<&S>,
    status: &S,
) -> Result<bool>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize + PartialEq,
{
    if current == Some(status) {
        return Ok(false);
    }
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        &object.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(true)
}

/// Publishes one Event per action; failures to publish are logged, never fatal.
pub async fn publish_actions<K>(ctx: &Context, object: &K, actions: &[Action])
where
    K: Resource<DynamicType = ()>,
{
    for action in actions {
        let type_ = match Reason::parse(action.reason) {
            Some(Reason::ConnectivityTestFailed | Reason::NotFound) => EventType::Warning,
            _ => EventType::Normal,
        };
        publish(ctx, object, type_, action.reason, &action.message).await;
    }
}

pub async fn publish<K>(ctx: &Context, object: &K, type_: EventType, reason: &str, note: &str)
where
    K: Resource<DynamicType = ()>,
{
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &object.object_ref(&())).await {
        tracing::warn!(%error, reason, "could not publish event");
    }
}

/// Marks a reconcile that could not reach its engine (connection, Secret, spec): `Synced`
/// False with the error's reason and message, and `Ready` following it.
pub fn mark_failed(conditions: &mut Vec<Condition>, error: &super::Error, generation: Option<i64>) {
    let stamp = now();
    conditions::set_condition(
        conditions,
        ConditionUpdate::new(SYNCED, false, error.reason(), error.message()),
        generation,
        &stamp,
    );
    let ready = conditions::ready_summary(conditions, &[SYNCED]);
    conditions::set_condition(conditions, ready, generation, &stamp);
}

/// Marks a suspended object: `Ready` False, reason `Suspended`.
pub fn mark_suspended(conditions: &mut Vec<Condition>, generation: Option<i64>, message: &str) {
    conditions::set_condition(
        conditions,
        ConditionUpdate::new(READY, Status::False, Reason::Suspended.as_str(), message),
        generation,
        &now(),
    );
}

/// Events for what an engine did, and a Warning for the error that stopped it, if any.
pub async fn publish_outcome<K>(
    ctx: &Context,
    object: &K,
    actions: &[Action],
    error: Option<&crate::sync::Error>,
) where
    K: Resource<DynamicType = ()>,
{
    publish_actions(ctx, object, actions).await;
    if let Some(error) = error {
        publish(
            ctx,
            object,
            EventType::Warning,
            error.reason(),
            &error.message(),
        )
        .await;
    }
}
