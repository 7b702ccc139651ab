//! Pieces shared by the three kinds: the optional per-object GitLab connection, references
//! to Secrets and objects in the object's own namespace, and the deletion policy.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Overrides the operator's default GitLab connection for one object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GitLabConnection {
    /// Base URL of the GitLab instance, e.g. `https://gitlab.example.com` (without `/api/v4`).
    pub url: String,
    /// Secret in this object's namespace holding a GitLab access token with the `api` scope
    /// and at least the Maintainer role on the group. There is deliberately no namespace
    /// field: a Secret is only ever read from the object's own namespace.
    pub token_secret_ref: SecretKeyReference,
}

/// A key of a Secret in the object's own namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyReference {
    /// Name of the Secret, in the same namespace as the object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Reference to another object of this operator in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectReference {
    /// Name of the object, in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// What happens in GitLab when the Kubernetes object is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Delete the GitLab object together with the Kubernetes object.
    #[default]
    Delete,
    /// Leave the GitLab object untouched; only the Kubernetes object goes.
    Orphan,
}

pub(crate) fn default_true() -> bool {
    true
}
