//! What every kind's status rules share: the time a condition is stamped with, and whether
//! anything asked for a reconcile since the last one.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Resource;

/// Whether nothing asked for a reconcile since the status was written: its spec generation
/// was observed and no reconcile was requested (the `reconcile-requested-at` annotation is
/// the one handled).
pub fn nothing_requested_since<K: Resource>(
    object: &K,
    observed_generation: Option<i64>,
    last_handled_reconcile_at: Option<&String>,
) -> bool {
    observed_generation.is_some()
        && observed_generation == object.meta().generation
        && object
            .meta()
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(crate::crd::RECONCILE_REQUESTED_AT))
            == last_handled_reconcile_at
}

pub fn now() -> Time {
    Time(jiff::Timestamp::now())
}
