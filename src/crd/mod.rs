//! The Rust types of the three custom resources (`VirtualRegistry`, `Upstream`,
//! `CleanupPolicy`), the pieces they share (GitLab connection, Secret references, deletion
//! policy), the condition helpers, and the generation of their CRD YAML.

pub mod cleanup_policy;
pub mod common;
pub mod conditions;
pub mod reasons;
pub mod upstream;
pub mod validation;
pub mod virtual_registry;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use cleanup_policy::{
    CleanupPolicy, CleanupPolicySpec, CleanupPolicyStatus, CleanupStrategy, GitLabCadence,
    GitLabKeepN, GitLabOlderThan, RunOutcome,
};
pub use common::{DeletionPolicy, GitLabConnection, LocalObjectReference, SecretKeyReference};
pub use upstream::{Upstream, UpstreamSpec, UpstreamStatus};
pub use virtual_registry::{VirtualRegistry, VirtualRegistrySpec, VirtualRegistryStatus};

/// API group of every kind.
pub const GROUP: &str = "gitlabregistry.io";
/// API version of every kind.
pub const VERSION: &str = "v1alpha1";
/// Finalizer that guards the GitLab side of an object.
pub const FINALIZER: &str = "gitlabregistry.io/finalizer";
/// One-shot annotation: reconcile now, once per new value.
pub const RECONCILE_REQUESTED_AT: &str = "gitlabregistry.io/reconcile-requested-at";
/// One-shot annotation: purge the GitLab cache, once per new value.
pub const PURGE_CACHE_REQUESTED_AT: &str = "gitlabregistry.io/purge-cache-requested-at";
/// One-shot annotation: run the cleanup now, once per new value.
pub const RUN_REQUESTED_AT: &str = "gitlabregistry.io/run-requested-at";
/// Approval of cleanup deletions over `limits.maxDeletionPercent`: `<fingerprint>[,…]`, as
/// `status.lastRun.pendingApproval` lists them.
pub const APPROVE_DELETION: &str = "gitlabregistry.io/approve-deletion";

/// Every CRD with the file name it is kept under in `crds/`.
pub fn all() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("virtualregistries.yaml", VirtualRegistry::crd()),
        ("upstreams.yaml", Upstream::crd()),
        ("cleanuppolicies.yaml", CleanupPolicy::crd()),
    ]
}

/// One CRD as YAML, the exact text of its file in `crds/`.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_saphyr::SerializeError> {
    serde_saphyr::to_string(crd)
}

/// All CRDs as one multi-document YAML stream, as printed by `gitlab-registry-operator crds`.
pub fn all_yaml() -> Result<String, serde_saphyr::SerializeError> {
    let mut out = String::new();
    for (_, crd) in all() {
        out.push_str("---\n");
        out.push_str(&to_yaml(&crd)?);
    }
    Ok(out)
}
